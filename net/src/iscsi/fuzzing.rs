//! A driver for fuzzing the iSCSI engine: initiator bytes in, a real stack
//! of md disks behind, and the engine's invariants checked at every step.
//! Shared by the cargo-fuzz target (`net/fuzz`, target `iscsi`, feature
//! `fuzzing`) and the time-bounded fuzz run in the test suite; the NBD
//! engine's twin is [`crate::nbd::fuzzing`].
//!
//! The input is an initiator's byte stream (a captured transcript, or
//! anything else) to one [`Connection`] serving target [`TARGET`] with two
//! LUNs of [`EXPORT_BYTES`] each: LUN 0 read-write, LUN 1 read-only. The
//! connection's limits, how the input is cut into calls, whether it goes
//! through [`Session::recv`] or straight into the pages of
//! [`Session::rx_pieces`], how output is drained (copied or vectored, in
//! what sizes), when the service admits a command's pages
//! ([`Session::budget_grant`]), in which order bios go to the stack, which
//! completions are held back for later rounds (the disk completes
//! asynchronously and out of order), which fail, and when the clock ticks
//! or the server stops are all derived from a hash of the input, so one
//! input always runs the same way.
//!
//! Checked at every step: no panic; input never over-consumed; no input
//! taken while a command waits for its pages; every bio the engine hands
//! out is for an export that exists, inside it, block-aligned, never a
//! write to the read-only LUN, with a cookie no other bio in flight has,
//! and `in_flight()` counts exactly the bios out; `budget_held()` grows
//! only by what the service admitted; the output decodes as target PDUs
//! (known opcodes, zero padding, header and data digests once negotiated,
//! a MaxCmdSN that never goes back and an ExpCmdSN at most one past it);
//! and once the input closes (or the transport goes) and the bios are
//! back, the connection finishes holding nothing.
//!
//! The engine keeps the state of each logical unit (mode page values,
//! reservations) in a process-wide table by export name, as a target does
//! for all its sessions. So that an input runs the same way whatever ran
//! before it, runs take a lock (one at a time in a process) and each
//! starts by putting the units back as an initiator would: a session that
//! clears SWP and D_SENSE with MODE SELECT and every persistent
//! registration and reservation with PERSISTENT RESERVE OUT CLEAR.

use super::pdu::{self, op, Bhs, BHS_LEN, NO_TAG};
use super::{text, Config, Connection};
use crate::fuzz_support::{seed, Rng};
use crate::session::{ExportInfo, RxPieces, Session, TxPiece, TxPieces, Work};
use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use crypt::crc32c::crc32c;
use geom::bio::{Bio, BioCmd, BioError, BioResult, ConsumerId};
use geom::class::md::MdGeom;
use geom::page::{DataCounters, PAGE_SIZE};
use geom::stack::Stack;

/// Size of each export the driver serves.
pub const EXPORT_BYTES: u64 = 4 << 20;

/// The target the captured transcripts log in to.
pub const TARGET: &str = "iqn.2026-12.org.strata:fuzz";

/// The exports: `TARGET/0` (read-write, its persistent state kept) and
/// `TARGET/1` (read-only), md disks of [`EXPORT_BYTES`].
pub fn exports() -> Vec<ExportInfo> {
    (0..2)
        .map(|lun| ExportInfo {
            read_only: lun == 1,
            keeps_state: lun == 0,
            ..ExportInfo::md(&alloc::format!("{TARGET}/{lun}"), EXPORT_BYTES)
        })
        .collect()
}

/// What one run did, for tests of the driver itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Logins that reached the full-feature phase (a final Login
    /// Response with status 0).
    pub logins: u64,
    /// Bios the engine handed out.
    pub bios: u64,
    /// Completions the disk held back over a round (delivered later).
    pub held_over: u64,
    /// Completions the driver turned into errors.
    pub failed: u64,
    /// Input bytes placed straight into a command's pages.
    pub placed: u64,
    /// Commands admitted by the service after waiting for their pages.
    pub grants: u64,
    /// Complete PDUs decoded from the output.
    pub pdus: u64,
    /// Of those, Data-In PDUs.
    pub data_in: u64,
    /// Of those, R2Ts.
    pub r2t: u64,
}

/// The target's output, decoded as it comes, and checked.
#[derive(Default)]
struct Decoder {
    buf: Vec<u8>,
    /// HeaderDigest and DataDigest as the login responses last said.
    offered: (bool, bool),
    /// Digests in force (from the PDU after the final login response).
    digests: (bool, bool),
    max_cmd_sn: Option<u32>,
}

impl Decoder {
    /// Takes output bytes and checks every PDU they complete.
    fn feed(&mut self, bytes: &[u8], stats: &mut Stats) {
        let mut buf = core::mem::take(&mut self.buf);
        buf.extend_from_slice(bytes);
        let mut at = 0;
        while let Some(n) = self.one(&buf[at..], stats) {
            at += n;
        }
        buf.drain(..at);
        self.buf = buf;
    }

    /// Decodes the PDU at the start of `b`; its length, or `None` if it
    /// is not all there yet.
    fn one(&mut self, b: &[u8], stats: &mut Stats) -> Option<usize> {
        let (hd, dd) = self.digests;
        let hl = BHS_LEN + if hd { 4 } else { 0 };
        if b.len() < BHS_LEN {
            return None;
        }
        let mut h = [0u8; BHS_LEN];
        h.copy_from_slice(&b[..BHS_LEN]);
        let bhs = Bhs(h);
        let ahs = bhs.ahs_len();
        let dl = bhs.data_len();
        let padded = dl + pdu::pad(dl);
        let total = hl + ahs + padded + if dd && dl > 0 { 4 } else { 0 };
        if b.len() < total {
            return None;
        }
        let opcode = bhs.opcode();
        assert!(
            matches!(
                opcode,
                op::NOP_IN
                    | op::SCSI_RSP
                    | op::TMF_RSP
                    | op::LOGIN_RSP
                    | op::TEXT_RSP
                    | op::DATA_IN
                    | op::LOGOUT_RSP
                    | op::R2T
                    | 0x32
                    | op::REJECT
            ),
            "output PDU with initiator or unknown opcode {opcode:#x}"
        );
        if hd {
            let got = u32::from_le_bytes([b[48], b[49], b[50], b[51]]);
            assert_eq!(got, crc32c(&b[..BHS_LEN]), "header digest of a target PDU");
        }
        let d0 = hl + ahs;
        let data = &b[d0..d0 + dl];
        assert!(
            b[d0 + dl..d0 + padded].iter().all(|&x| x == 0),
            "padding is zeroes"
        );
        if dd && dl > 0 {
            let at = d0 + padded;
            let got = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            assert_eq!(got, crc32c(&b[d0..at]), "data digest of a target PDU");
        }
        // Every target PDU carries ExpCmdSN and MaxCmdSN at 28 and 32
        // (a Data-In without status too); the window never shrinks and
        // is never negative beyond one (RFC 7143 §3.2.2.1).
        let (exp, max) = (bhs.u32_at(28), bhs.u32_at(32));
        assert!(
            pdu::sn_le(exp, max.wrapping_add(1)),
            "ExpCmdSN {exp} beyond MaxCmdSN {max} + 1 in {opcode:#x}"
        );
        if let Some(prev) = self.max_cmd_sn {
            assert!(
                pdu::sn_le(prev, max),
                "MaxCmdSN went back from {prev} to {max} in {opcode:#x}"
            );
        }
        self.max_cmd_sn = Some(max);
        match opcode {
            op::LOGIN_RSP => {
                if let Ok(keys) = text::parse(data) {
                    for (k, v) in keys {
                        match k.as_str() {
                            "HeaderDigest" => self.offered.0 = v == "CRC32C",
                            "DataDigest" => self.offered.1 = v == "CRC32C",
                            _ => {}
                        }
                    }
                }
                let status = bhs.u16_at(36);
                if status == 0 && bhs.flags() & 0x83 == 0x83 {
                    self.digests = self.offered;
                    stats.logins += 1;
                }
            }
            op::DATA_IN => {
                stats.data_in += 1;
                assert!(dl > 0, "Data-In carries data");
            }
            op::R2T => {
                stats.r2t += 1;
                assert_ne!(bhs.u32_at(20), NO_TAG, "R2T with a transfer tag");
                assert!(bhs.u32_at(44) > 0, "R2T asks for bytes");
            }
            op::SCSI_RSP if dl > 0 => {
                assert!(dl >= 2, "sense length field");
                let sl = usize::from(pdu::be16(data, 0));
                assert!(sl + 2 <= dl, "sense within the data segment");
            }
            _ => {}
        }
        stats.pdus += 1;
        Some(total)
    }
}

/// Everything one run keeps besides the connection.
struct Rig {
    rng: Rng,
    stack: Stack,
    consumers: [ConsumerId; 2],
    exports: Vec<ExportInfo>,
    /// Completions the stack has made that the driver has not delivered
    /// yet: an asynchronous disk, whose completions come later and out of
    /// order.
    held: Vec<(u64, Bio, BioResult)>,
    /// Cookies of bios handed out and not yet completed.
    out: BTreeSet<u64>,
    /// What `budget_held()` may be: what it was, or what the service
    /// admitted since.
    allowed: u64,
    budgeted: bool,
    /// Rounds a command has waited for its pages.
    waited: u32,
    decoder: Decoder,
    stats: Stats,
    counters: DataCounters,
}

impl Rig {
    /// Checks a bio the engine handed out.
    fn check_bio(&self, export: usize, bio: &Bio, cookie: u64) {
        assert!(cookie < 1 << 32, "cookie fits 32 bits");
        assert!(export < self.exports.len(), "bio for export {export}");
        let e = &self.exports[export];
        let end = bio.offset.checked_add(bio.length);
        assert!(
            end.is_some_and(|end| end <= e.size_bytes),
            "{:?} at {} + {} outside the {}-byte export",
            bio.cmd,
            bio.offset,
            bio.length,
            e.size_bytes
        );
        assert!(
            !(e.read_only && bio.cmd.is_write()),
            "{:?} to the read-only export",
            bio.cmd
        );
        if bio.cmd != BioCmd::Flush {
            assert!(
                bio.offset.is_multiple_of(512) && bio.length.is_multiple_of(512),
                "{:?} at {} + {} not in blocks",
                bio.cmd,
                bio.offset,
                bio.length
            );
        }
        match bio.cmd {
            BioCmd::Read | BioCmd::Write => {
                assert_eq!(bio.sg.len_bytes(), bio.length, "pages cover the bio");
            }
            _ => assert_eq!(bio.sg.len_bytes(), 0, "no pages on a {:?}", bio.cmd),
        }
        assert!(
            !self.out.contains(&cookie),
            "cookie {cookie:#x} handed out twice while in flight"
        );
    }

    /// Moves bios through the stack, in a random order, and completions
    /// back: some held for a later round, the rest delivered shuffled,
    /// a few failed. With `all`, every held completion is delivered.
    fn pump(&mut self, conn: &mut Connection, all: bool) {
        let mut reqs = Vec::new();
        let mut saves = Vec::new();
        while let Some(w) = conn.next_work() {
            let (export, bio, cookie) = match w {
                Work::Io {
                    export,
                    bio,
                    cookie,
                } => (export, bio, cookie),
                Work::Save {
                    export,
                    state,
                    cookie,
                } => {
                    assert!(
                        exports()[export].keeps_state,
                        "a save for export {export}, which keeps no state"
                    );
                    assert!(
                        crate::iscsi::scsi::UnitState::from_bytes(&state).is_some(),
                        "a saved state that does not parse back"
                    );
                    assert!(self.out.insert(cookie), "cookie {cookie:#x} out twice");
                    saves.push(cookie);
                    continue;
                }
                Work::Control(_) => panic!("the iSCSI engine asked for management work"),
            };
            self.check_bio(export, &bio, cookie);
            self.out.insert(cookie);
            self.stats.bios += 1;
            reqs.push((export, bio, cookie));
        }
        assert_eq!(
            conn.in_flight(),
            self.out.len(),
            "in_flight() counts the bios out"
        );
        while !reqs.is_empty() {
            let (export, bio, cookie) =
                reqs.swap_remove(self.rng.below(reqs.len() as u64) as usize);
            self.stack.submit(self.consumers[export], bio, cookie);
        }
        self.stack.run();
        while let Some(c) = self.stack.take_completed() {
            self.held.push(c);
        }
        for cookie in saves {
            self.out.remove(&cookie);
            let res = if self.rng.one_in(16) {
                self.stats.failed += 1;
                Err(BioError::Io)
            } else {
                Ok(())
            };
            conn.saved(cookie, res);
        }
        let keep = if all || self.rng.one_in(4) {
            0
        } else {
            self.rng.below(self.held.len() as u64 + 1) as usize
        };
        self.stats.held_over += keep as u64;
        while self.held.len() > keep {
            let i = self.rng.below(self.held.len() as u64) as usize;
            let (cookie, bio, mut res) = self.held.swap_remove(i);
            if self.rng.one_in(64) {
                res = Err([BioError::Io, BioError::NoMemory, BioError::NoSpace]
                    [self.rng.below(3) as usize]);
                self.stats.failed += 1;
            }
            assert!(self.out.remove(&cookie), "completion for a bio out");
            conn.complete(cookie, bio, res);
        }
    }

    /// The service's side of the payload budget: a command waiting for
    /// its pages is admitted now or after a few rounds; what the session
    /// holds grows only by what was admitted.
    fn budget(&mut self, conn: &mut Connection) {
        let held = conn.budget_held();
        assert!(
            !self.budgeted || held <= self.allowed,
            "budget_held() {held} above the {} admitted",
            self.allowed
        );
        self.allowed = held;
        let Some(want) = conn.budget_wanted() else {
            self.waited = 0;
            return;
        };
        assert!(self.budgeted, "budget_wanted() without a budget");
        assert!(!conn.wants_recv(), "reading on while waiting for pages");
        if self.waited < 3 && self.rng.one_in(3) {
            self.waited += 1;
            return;
        }
        self.waited = 0;
        if conn.budget_grant() {
            self.stats.grants += 1;
            self.allowed = held.saturating_add(want);
            let after = conn.budget_held();
            assert!(
                after <= self.allowed,
                "granted {want} over {held}, holds {after}"
            );
        }
    }

    /// Feeds input: through `recv`, or into the pages the session names
    /// (a vectored receive, filled in part at random). Returns the bytes
    /// taken.
    fn feed(&mut self, conn: &mut Connection, data: &[u8]) -> usize {
        let waiting = conn.budget_wanted().is_some();
        let mut used = 0;
        while used < data.len() {
            let mut pieces = RxPieces::new();
            let room = conn.rx_pieces(&mut pieces);
            if room > 0 {
                assert!(conn.wants_recv(), "pages offered while not reading");
                let sum: usize = pieces.iter().map(|p| p.len).sum();
                assert_eq!(sum, room, "rx_pieces() counts its pieces");
                let mut want = room.min(data.len() - used);
                if self.rng.one_in(4) {
                    want = 1 + self.rng.below(want as u64) as usize;
                }
                let mut placed = 0;
                for p in &pieces {
                    assert!(p.offset + p.len <= PAGE_SIZE, "piece within its page");
                    if placed == want {
                        break;
                    }
                    let k = p.len.min(want - placed);
                    let src = &data[used + placed..used + placed + k];
                    assert!(
                        p.page.copy_in(p.offset, src, &self.counters).is_ok(),
                        "a receive page is busy"
                    );
                    placed += k;
                }
                drop(pieces);
                conn.rx_filled(placed);
                self.stats.placed += placed as u64;
                used += placed;
            } else {
                drop(pieces);
                let n = conn.recv(&self.exports, &data[used..]);
                assert!(n <= data.len() - used, "consumed more than given");
                if n == 0 {
                    break;
                }
                used += n;
            }
            if self.rng.one_in(2) {
                break;
            }
        }
        assert!(
            !waiting || used == 0,
            "took input while a command waited for its pages"
        );
        used
    }

    /// Drains output: copied into a buffer of a random size, or as pieces
    /// with a random part of them "sent"; everything sent is decoded.
    /// Returns the bytes sent.
    fn drain(&mut self, conn: &mut Connection, everything: bool) -> usize {
        let mut total = 0;
        for _ in 0..100_000 {
            let n = if self.rng.one_in(2) {
                let mut buf = alloc::vec![0u8; 1 + self.rng.below(70_000) as usize];
                let n = crate::session::copy_out(conn, &mut buf);
                self.decoder.feed(&buf[..n], &mut self.stats);
                n
            } else {
                let max = 1 + self.rng.below(1 << 20) as usize;
                let partial = self.rng.one_in(4);
                let cut = self.rng.next_u64();
                let mut pieces = TxPieces::new();
                conn.tx_pieces(&mut pieces, max);
                let offered: usize = pieces.iter().map(TxPiece::len).sum();
                let n = if partial {
                    (cut % (offered as u64 + 1)) as usize
                } else {
                    offered
                };
                let mut bytes = Vec::with_capacity(n);
                for p in &pieces {
                    let k = p.len().min(n - bytes.len());
                    match p {
                        TxPiece::Bytes(b) => bytes.extend_from_slice(&b[..k]),
                        TxPiece::Page(s) => {
                            let at = bytes.len();
                            bytes.resize(at + k, 0);
                            assert!(s.offset + s.len <= PAGE_SIZE, "piece within its page");
                            assert!(
                                s.page
                                    .copy_out(s.offset, &mut bytes[at..], &self.counters)
                                    .is_ok(),
                                "a send page is busy"
                            );
                        }
                    }
                    if bytes.len() == n {
                        break;
                    }
                }
                drop(pieces);
                conn.tx_advance(n);
                self.decoder.feed(&bytes, &mut self.stats);
                n
            };
            total += n;
            if n == 0 || (!everything && self.rng.one_in(3)) {
                break;
            }
        }
        total
    }
}

/// Runs one input through a connection and checks the invariants (see the
/// module's documentation).
pub fn run(data: &[u8]) {
    run_counted(data);
}

/// [`run`], returning what the driver did.
pub fn run_counted(data: &[u8]) -> Stats {
    let mut rng = Rng(seed(data));
    let cfg = config(&mut rng);
    run_with(data, rng, cfg)
}

/// [`run_counted`] with the connection configured as hosted Strata
/// configures it (the transcripts were recorded so); the rest of the
/// schedule still follows from the input.
pub fn run_as_recorded(data: &[u8]) -> Stats {
    let mut rng = Rng(seed(data));
    let _ = config(&mut rng);
    let cfg = Config {
        budgeted: true,
        ..Config::default()
    };
    run_with(data, rng, cfg)
}

/// The connection's limits, from the input.
fn config(rng: &mut Rng) -> Config {
    let mut cfg = Config {
        // The CmdSN window: the transcripts were recorded with hosted
        // Strata's 64, and a smaller one drops the commands a pipelining
        // initiator sent beyond it, so it is the rare case.
        max_in_flight: match rng.below(8) {
            0 => 1 + rng.below(64) as usize,
            1 | 2 => 64 + rng.below(64) as usize,
            _ => 64,
        },
        stall_timeout_ms: rng.below(3) * 30_000,
        budgeted: !rng.one_in(4),
        portal: rng.one_in(2).then_some(([127, 0, 0, 1], 3260)),
        seed: rng.one_in(2).then(|| [rng.next_u64() as u8; 32]),
        ..Config::default()
    };
    if rng.one_in(8) {
        // Tighter limits than hosted Strata's: the transcripts' large
        // immediate data meets smaller segments and bursts.
        cfg.limits.recv_segment = 512 << rng.below(10);
        cfg.limits.max_burst = 512 << rng.below(12);
        cfg.limits.max_outstanding_r2t = 1 + rng.below(16) as u32;
    }
    cfg
}

/// One run at a time: the units' state is shared.
static RUNS: spin::Mutex<()> = spin::Mutex::new(());

/// One PDU to `conn`, data padded; runs any bio on the spot (none is
/// expected) and returns the target's answer, as bytes.
fn say(
    conn: &mut Connection,
    exports: &[ExportInfo],
    mut h: [u8; BHS_LEN],
    data: &[u8],
) -> Vec<u8> {
    pdu::set_data_len(&mut h, data.len());
    let mut v = h.to_vec();
    v.extend_from_slice(data);
    v.resize(v.len() + pdu::pad(data.len()), 0);
    let _ = crate::session::copy_in(conn, exports, &v);
    while let Some(w) = conn.next_work() {
        match w {
            Work::Io { bio, cookie, .. } => conn.complete(cookie, bio, Err(BioError::Io)),
            Work::Save { cookie, .. } => conn.saved(cookie, Err(BioError::Io)),
            Work::Control(_) => {}
        }
    }
    let mut out = Vec::new();
    let mut buf = alloc::vec![0u8; 4096];
    loop {
        let n = crate::session::copy_out(conn, &mut buf);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// A SCSI Command header for `lun`: CDB, flags (R 0x40, W 0x20), ITT,
/// CmdSN, expected length.
fn command(lun: u8, cdb: &[u8], flags: u8, itt: u32, edtl: u32) -> [u8; BHS_LEN] {
    let mut h = pdu::header(op::SCSI_CMD, 0x80 | flags);
    h[9] = lun;
    pdu::put32(&mut h, 16, itt);
    pdu::put32(&mut h, 20, edtl);
    pdu::put32(&mut h, 24, itt);
    h[32..32 + cdb.len()].copy_from_slice(cdb);
    h
}

/// Puts the units of [`TARGET`] back in their first state (see the
/// module's documentation).
fn reset_units() {
    let exports = exports();
    let mut conn = Connection::new(Config::default());
    let mut login = pdu::header(op::LOGIN_REQ | 0x40, 0x87);
    login[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0x52, 0x53]);
    pdu::put32(&mut login, 24, 1);
    let mut keys = Vec::new();
    text::push(
        &mut keys,
        "InitiatorName",
        "iqn.2026-12.org.strata:fuzz-reset",
    );
    text::push(&mut keys, "TargetName", TARGET);
    text::push(&mut keys, "SessionType", "Normal");
    let _ = say(&mut conn, &exports, login, &keys);
    let mut itt = 1;
    for lun in 0..2u8 {
        // A unit attention may stand in the way of the first command.
        for _ in 0..2 {
            let _ = say(&mut conn, &exports, command(lun, &[0; 6], 0, itt, 0), &[]);
            itt += 1;
        }
        // MODE SENSE(6) of the Control page, DBD: header and page.
        let cdb = [0x1a, 0x08, 0x0a, 0, 255, 0];
        let out = say(&mut conn, &exports, command(lun, &cdb, 0x40, itt, 255), &[]);
        itt += 1;
        if out.len() >= BHS_LEN + 16 && out[0] & 0x3f == op::DATA_IN {
            let mut p = out[BHS_LEN..BHS_LEN + 16].to_vec();
            p[0] = 0;
            p[4] &= 0x7f;
            p[6] &= !0x04;
            p[8] &= !0x08;
            let cdb = [0x15, 0x10, 0, 0, 16, 0];
            let _ = say(&mut conn, &exports, command(lun, &cdb, 0x20, itt, 16), &p);
            itt += 1;
        }
        // PERSISTENT RESERVE OUT: REGISTER AND IGNORE EXISTING KEY, then
        // CLEAR.
        for (sa, key, sa_key) in [(6u8, 0u64, 0x5354u64), (3, 0x5354, 0)] {
            let cdb = [0x5f, sa, 0, 0, 0, 0, 0, 0, 24, 0];
            let mut p = [0u8; 24];
            p[..8].copy_from_slice(&key.to_be_bytes());
            p[8..16].copy_from_slice(&sa_key.to_be_bytes());
            let _ = say(&mut conn, &exports, command(lun, &cdb, 0x20, itt, 24), &p);
            itt += 1;
        }
    }
    conn.shutdown();
}

/// One run of `data` on a connection configured as `cfg`, the schedule
/// drawn from `rng`.
fn run_with(data: &[u8], rng: Rng, cfg: Config) -> Stats {
    let _one = RUNS.lock();
    reset_units();
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
    let mut rig = Rig {
        rng,
        stack,
        consumers,
        exports: exports(),
        held: Vec::new(),
        out: BTreeSet::new(),
        allowed: 0,
        budgeted: cfg.budgeted,
        waited: 0,
        decoder: Decoder::default(),
        stats: Stats::default(),
        counters: DataCounters::new(),
    };
    let mut conn = Connection::new(cfg);
    let mut off = 0;
    let mut now = 0u64;
    let mut stuck = 0;
    conn.tick(now);
    while off < data.len() && stuck < 8 {
        let piece = match rig.rng.below(4) {
            0 => 1 + rig.rng.below(8),
            1 => 1 + rig.rng.below(600),
            _ => 1 + rig.rng.below(70_000),
        } as usize;
        let end = off.saturating_add(piece).min(data.len());
        let used = rig.feed(&mut conn, &data[off..end]);
        off += used;
        rig.pump(&mut conn, false);
        rig.budget(&mut conn);
        let sent = rig.drain(&mut conn, false);
        rig.budget(&mut conn);
        // The clock: mostly small steps; now and then a long silence,
        // past the login and stall timeouts.
        if rig.rng.one_in(16) {
            now += rig.rng.below(2_000);
            if rig.rng.one_in(32) {
                now += rig.rng.below(100_000);
            }
            conn.tick(now);
        }
        if rig.rng.one_in(512) {
            conn.begin_shutdown();
        }
        if conn.is_finished() {
            break;
        }
        // Held completions, output and grants are still to come: not
        // stuck yet.
        let busy = !rig.held.is_empty() || sent > 0 || conn.budget_wanted().is_some();
        stuck = if used > 0 || busy { 0 } else { stuck + 1 };
    }
    if rig.rng.one_in(4) {
        // The transport goes away at once.
        conn.shutdown();
    } else {
        // The initiator closes its side: what is running is answered, the
        // bios come back, the output goes out, and the connection is over.
        conn.input_closed();
        for _ in 0..64 {
            rig.pump(&mut conn, true);
            rig.budget(&mut conn);
            rig.drain(&mut conn, true);
            if conn.is_finished() {
                break;
            }
        }
        assert!(
            conn.is_finished(),
            "finished once the input closed and the bios are back"
        );
        conn.shutdown();
    }
    for _ in 0..64 {
        rig.pump(&mut conn, true);
        if rig.out.is_empty() && rig.held.is_empty() {
            break;
        }
    }
    rig.pump(&mut conn, true);
    assert!(rig.held.is_empty() && rig.out.is_empty(), "every bio back");
    assert_eq!(conn.in_flight(), 0, "no bio in flight at the end");
    assert!(conn.is_finished(), "finished after shutdown");
    assert!(!conn.has_tx(), "no output after shutdown");
    assert!(!conn.wants_recv(), "no input after shutdown");
    assert_eq!(conn.budget_held(), 0, "nothing held at the end");
    rig.stats
}
