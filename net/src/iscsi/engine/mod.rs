//! One iSCSI connection's state machine (RFC 7143), over byte slices.
//!
//! A session has one connection (MaxConnections=1), so the
//! [`Connection`] is the session too. It is one struct declared here with
//! its fields; each concern is an `impl Connection` block in its own file:
//!
//! - `mod.rs`: limits, the constructor, the input parser (header, AHS,
//!   digests, data segment: into a task's pages, a buffer or nowhere),
//!   the dispatcher by opcode, and the [`Session`] impl;
//! - `login.rs`: the login phase (security and operational stages, CHAP)
//!   and the text requests of the full-feature phase (SendTargets);
//! - `task.rs`: SCSI commands: the CmdSN window, the SCSI layer's tasks,
//!   immediate and unsolicited data, R2Ts and Data-Out, bios, Data-In
//!   and the SCSI Response with its residuals, task management;
//! - `tx.rs`: the output queue of PDUs and the pieces of a vectored send.

mod atomic;
mod login;
mod task;
mod tx;

use super::pdu::{self, op, Bhs, BHS_LEN};
use super::text::{self, Params};
use crate::session::{ExportInfo, Peer, RxPieces, Session, TxPieces, Work};
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use crypt::crc32c::Crc32c;
use crypt::rng::Csprng;
use geom::bio::{Bio, BioResult};
use geom::page::DataCounters;
use login::LoginState;
pub use task::restore_unit;
use task::Tasks;
use tx::TxQueue;

/// A login still going this many milliseconds after the first tick is
/// dropped.
pub const LOGIN_TIMEOUT_MS: u64 = 30_000;

/// Longest data segment taken outside a task's pages (login and text
/// keys, NOP-Out ping data).
const CTL_DATA_MAX: usize = 64 * 1024;

/// Limits for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Most commands outstanding at once: the CmdSN window.
    pub max_in_flight: usize,
    /// A connection that holds payload pages and moves no byte for this
    /// many milliseconds is dropped (0: never).
    pub stall_timeout_ms: u64,
    /// A command's pages wait for the service's global budget.
    pub budgeted: bool,
    /// What the target declares and accepts in login.
    pub limits: text::Limits,
    /// The address SendTargets gives for every target (IPv4, port), as
    /// initiators reach it; `None`: no TargetAddress is sent.
    pub portal: Option<([u8; 4], u16)>,
    /// Seed for the CHAP challenges (from the stack's key generator);
    /// `None`: CHAP logins are refused.
    pub seed: Option<[u8; 32]>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_in_flight: 64,
            stall_timeout_ms: 60_000,
            budgeted: false,
            limits: text::Limits::default(),
            portal: None,
            seed: None,
        }
    }
}

/// Where the bytes of the data segment being received go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sink {
    /// Into `ctl_data` (login, text, NOP-Out).
    Buffer,
    /// Into the pages of task `slot`, from byte `at` of its Data-Out, for
    /// `len` bytes; bytes past `len` are dropped.
    Task { slot: u32, at: u32, len: u32 },
    /// Nowhere.
    Drop,
}

/// The input parser's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rx {
    /// Gathering BHS, AHS and header digest into `hdr`.
    Header,
    /// In the data segment: `done` of `total` bytes (data, then padding,
    /// then the data digest).
    Data { done: usize, total: usize },
}

/// Why the connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// After the output already queued is sent.
    Soft,
    /// Now: drop queued output.
    Hard,
}

/// One iSCSI connection, and the session it carries.
pub struct Connection {
    cfg: Config,
    counters: DataCounters,
    params: Params,
    rx: Rx,
    hdr: Vec<u8>,
    bhs: Bhs,
    sink: Sink,
    bad_data_out: bool,
    ctl_data: Vec<u8>,
    data_crc: Crc32c,
    rng: Csprng,
    login: LoginState,
    tasks: Tasks,
    tx: TxQueue,
    work: VecDeque<Work>,
    closing: Option<Close>,
    input_done: bool,
    stopping: bool,
    first_tick: Option<u64>,
    now_ms: u64,
    last_move_ms: u64,
    timed_out: bool,
}

impl Connection {
    /// A connection waiting for its first login request.
    pub fn new(cfg: Config) -> Connection {
        Connection {
            cfg,
            counters: DataCounters::new(),
            params: Params::default(),
            rx: Rx::Header,
            hdr: Vec::with_capacity(BHS_LEN + 4),
            bhs: Bhs([0; BHS_LEN]),
            sink: Sink::Drop,
            bad_data_out: false,
            ctl_data: Vec::new(),
            data_crc: Crc32c::new(),
            rng: {
                let mut r = Csprng::unseeded();
                if let Some(s) = cfg.seed {
                    r.mix(&s);
                }
                r
            },
            login: LoginState::new(),
            tasks: Tasks::new(cfg.max_in_flight),
            tx: TxQueue::new(),
            work: VecDeque::new(),
            closing: None,
            input_done: false,
            stopping: false,
            first_tick: None,
            now_ms: 0,
            last_move_ms: 0,
            timed_out: false,
        }
    }

    /// Header bytes still wanted: BHS, then AHS and header digest.
    fn header_want(&self) -> usize {
        if self.hdr.len() < BHS_LEN {
            return BHS_LEN;
        }
        let digest = if self.digests().0 { 4 } else { 0 };
        BHS_LEN + self.bhs.ahs_len() + digest
    }

    /// A complete header is in `hdr`: checks its digest, and decides where
    /// its data goes.
    fn header_done(&mut self, exports: &[ExportInfo]) {
        if self.digests().0 {
            let n = self.hdr.len() - 4;
            let mut c = Crc32c::new();
            c.update(&self.hdr[..n]);
            let want = u32::from_le_bytes([
                self.hdr[n],
                self.hdr[n + 1],
                self.hdr[n + 2],
                self.hdr[n + 3],
            ]);
            if c.finish() != want {
                // ErrorRecoveryLevel 0: the PDU boundaries are lost.
                log::warn!("iscsi: header digest error, connection dropped");
                self.close(Close::Hard);
                return;
            }
        }
        let len = self.bhs.data_len();
        let max = if self.login.done() {
            self.params_recv_limit()
        } else {
            CTL_DATA_MAX
        };
        if len > max {
            log::warn!("iscsi: data segment of {len} bytes above {max}, connection dropped");
            self.close(Close::Hard);
            return;
        }
        self.sink = if !self.login.done() {
            Sink::Buffer
        } else {
            match self.bhs.opcode() {
                op::SCSI_CMD => self.command_header(),
                op::DATA_OUT => self.data_out_header(),
                _ => Sink::Buffer,
            }
        };
        self.ctl_data.clear();
        self.data_crc = Crc32c::new();
        let total = if len == 0 {
            0
        } else {
            len + pdu::pad(len) + if self.digests().1 { 4 } else { 0 }
        };
        self.rx = Rx::Data { done: 0, total };
        if total == 0 {
            self.pdu_done(exports);
        }
    }

    /// Header and data digests in use: as negotiated, from the first PDU
    /// after the login's last.
    fn digests(&self) -> (bool, bool) {
        if self.login.done() {
            (self.params.header_digest, self.params.data_digest)
        } else {
            (false, false)
        }
    }

    /// The most data one PDU may carry to the target.
    fn params_recv_limit(&self) -> usize {
        self.cfg.limits.recv_segment.max(self.params.recv_segment) as usize
    }

    /// Takes data-segment bytes (and padding and digest) from `data`.
    fn data_bytes(&mut self, exports: &[ExportInfo], data: &[u8]) -> usize {
        let Rx::Data { done, total } = self.rx else {
            return 0;
        };
        let len = self.bhs.data_len();
        let n = data.len().min(total - done);
        let mut i = 0;
        while i < n {
            let at = done + i;
            if at < len {
                let k = (len - at).min(n - i);
                let chunk = &data[i..i + k];
                if self.digests().1 {
                    self.data_crc.update(chunk);
                }
                match self.sink {
                    Sink::Buffer => self.ctl_data.extend_from_slice(chunk),
                    Sink::Task {
                        slot,
                        at: base,
                        len: room,
                    } => {
                        let off = at as u64;
                        if off < u64::from(room) {
                            let k2 = (u64::from(room) - off).min(k as u64) as usize;
                            self.tasks.place(
                                slot,
                                u64::from(base) + off,
                                &chunk[..k2],
                                &self.counters,
                            );
                        }
                    }
                    Sink::Drop => {}
                }
                i += k;
            } else if at < len + pdu::pad(len) {
                if self.digests().1 {
                    self.data_crc.update(&[data[i]]);
                }
                i += 1;
            } else {
                // The digest's bytes: gathered in `hdr`, which is free now.
                self.hdr.push(data[i]);
                i += 1;
            }
        }
        self.rx = Rx::Data {
            done: done + n,
            total,
        };
        if done + n == total {
            if !self.data_digest_ok() {
                log::warn!("iscsi: data digest error, connection dropped");
                self.close(Close::Hard);
                return n;
            }
            self.pdu_done(exports);
        }
        n
    }

    /// Checks the data digest gathered in `hdr` (true without digests).
    fn data_digest_ok(&mut self) -> bool {
        if !self.digests().1 || self.bhs.data_len() == 0 {
            return true;
        }
        let n = self.hdr.len();
        if n < 4 {
            return false;
        }
        let got = u32::from_le_bytes([
            self.hdr[n - 4],
            self.hdr[n - 3],
            self.hdr[n - 2],
            self.hdr[n - 1],
        ]);
        got == self.data_crc.finish()
    }

    /// A whole PDU is in: dispatches it by opcode.
    fn pdu_done(&mut self, exports: &[ExportInfo]) {
        self.rx = Rx::Header;
        self.hdr.clear();
        let bhs = self.bhs;
        let data = core::mem::take(&mut self.ctl_data);
        if !self.login.done() {
            if bhs.opcode() == op::LOGIN_REQ {
                self.login_request(exports, &bhs, &data);
            } else {
                log::warn!(
                    "iscsi: opcode {:#x} before login completed, connection dropped",
                    bhs.opcode()
                );
                self.close(Close::Hard);
            }
            self.ctl_data = data;
            return;
        }
        match bhs.opcode() {
            op::SCSI_CMD => self.command_data_done(),
            op::DATA_OUT => self.data_out_done(),
            op::NOP_OUT => self.nop_out(&bhs, &data),
            op::TEXT_REQ => self.text_request(exports, &bhs, &data),
            op::TMF_REQ => self.tmf_request(exports, &bhs),
            op::LOGOUT_REQ => self.logout_request(&bhs),
            op::LOGIN_REQ => {
                self.reject(&bhs, pdu::reject::PROTOCOL);
                self.close(Close::Soft);
            }
            _ => self.reject(&bhs, pdu::reject::NOT_SUPPORTED),
        }
        self.ctl_data = data;
    }

    /// NOP-Out: a ping (answered with a NOP-In carrying its data) or the
    /// answer to a NOP-In (nothing to do).
    fn nop_out(&mut self, bhs: &Bhs, data: &[u8]) {
        if !bhs.immediate() && !self.tasks.take_cmd_sn(bhs.cmd_sn()) {
            return;
        }
        if bhs.itt() == pdu::NO_TAG {
            return;
        }
        let mut h = pdu::header(op::NOP_IN, 0x80);
        h[8..16].copy_from_slice(&bhs.lun_field());
        pdu::put32(&mut h, 16, bhs.itt());
        pdu::put32(&mut h, 20, pdu::NO_TAG);
        let n = data.len().min(self.params.send_segment as usize);
        self.send_status(h, data[..n].to_vec());
    }

    /// Logout: answered, then the connection ends once it is sent.
    fn logout_request(&mut self, bhs: &Bhs) {
        if !bhs.immediate() {
            self.tasks.take_cmd_sn(bhs.cmd_sn());
        }
        let reason = bhs.flags() & 0x7f;
        let mut h = pdu::header(op::LOGOUT_RSP, 0x80);
        // 0: closed; 2: recovery is not supported (ErrorRecoveryLevel 0).
        h[2] = if reason == 2 { 2 } else { 0 };
        pdu::put32(&mut h, 16, bhs.itt());
        pdu::put16(&mut h, 40, self.params.time2wait as u16);
        pdu::put16(&mut h, 42, self.params.time2retain as u16);
        self.send_status(h, Vec::new());
        if reason != 2 {
            self.close(Close::Soft);
        }
    }

    /// Reject: the PDU's header goes back with the reason.
    fn reject(&mut self, bhs: &Bhs, reason: u8) {
        let mut h = pdu::header(op::REJECT, 0x80);
        h[2] = reason;
        pdu::put32(&mut h, 16, pdu::NO_TAG);
        self.send_status(h, bhs.0.to_vec());
    }

    /// Queues a status-bearing PDU: StatSN is its own, then advances.
    fn send_status(&mut self, mut h: [u8; BHS_LEN], data: Vec<u8>) {
        let sn = self.tasks.sn(true);
        sn.put(&mut h);
        self.queue_pdu(h, data);
    }

    /// Queues a PDU with the sequence numbers already in place (or none).
    fn queue_pdu(&mut self, mut h: [u8; BHS_LEN], data: Vec<u8>) {
        pdu::set_data_len(&mut h, data.len());
        let (hd, dd) = self.digests();
        self.tx.push_bytes(h, data, hd, dd);
    }

    /// Ends the connection.
    fn close(&mut self, how: Close) {
        self.session_gone();
        match (self.closing, how) {
            (Some(Close::Hard), _) => {}
            (_, Close::Hard) => {
                self.closing = Some(Close::Hard);
                self.tx.clear();
                self.tasks.abort_all();
            }
            _ => self.closing = Some(Close::Soft),
        }
    }
}

impl Session for Connection {
    fn recv(&mut self, exports: &[ExportInfo], data: &[u8]) -> usize {
        self.tasks.refresh(exports);
        let mut used = 0;
        while used < data.len() && self.wants_recv() {
            match self.rx {
                Rx::Header => {
                    let want = self.header_want();
                    let k = (want - self.hdr.len()).min(data.len() - used);
                    self.hdr.extend_from_slice(&data[used..used + k]);
                    used += k;
                    if self.hdr.len() == BHS_LEN {
                        let mut b = [0u8; BHS_LEN];
                        b.copy_from_slice(&self.hdr[..BHS_LEN]);
                        self.bhs = Bhs(b);
                    }
                    if self.hdr.len() >= BHS_LEN && self.hdr.len() == self.header_want() {
                        self.header_done(exports);
                    }
                }
                Rx::Data { .. } => {
                    let n = self.data_bytes(exports, &data[used..]);
                    if n == 0 {
                        break;
                    }
                    used += n;
                }
            }
        }
        if used > 0 {
            self.last_move_ms = self.now_ms;
        }
        used
    }

    fn rx_pieces<'a>(&'a self, out: &mut RxPieces<'a>) -> usize {
        let Rx::Data { done, .. } = self.rx else {
            return 0;
        };
        let Sink::Task { slot, at, len } = self.sink else {
            return 0;
        };
        if self.digests().1 || !self.wants_recv() {
            return 0;
        }
        let seg = self.bhs.data_len().min(len as usize);
        if done >= seg {
            return 0;
        }
        self.tasks
            .pieces(slot, u64::from(at) + done as u64, (seg - done) as u64, out)
    }

    fn rx_filled(&mut self, n: usize) {
        if let Rx::Data { done, total } = self.rx {
            let n = n.min(total - done);
            self.rx = Rx::Data {
                done: done + n,
                total,
            };
            self.last_move_ms = self.now_ms;
            if done + n == total {
                // Pieces carry only a data PDU's payload, whose handling
                // needs no export list (the session keeps its LUNs).
                self.pdu_done(&[]);
            }
        }
    }

    fn tx_pieces<'a>(&'a mut self, out: &mut TxPieces<'a>, max_bytes: usize) {
        if self.closing == Some(Close::Hard) {
            return;
        }
        self.tx.pieces(out, max_bytes);
    }

    fn tx_advance(&mut self, n: usize) {
        if n > 0 {
            self.last_move_ms = self.now_ms;
        }
        self.tx.advance(n);
        self.tasks.sent(&mut self.tx);
    }

    fn next_work(&mut self) -> Option<Work> {
        self.work.pop_front()
    }

    fn complete(&mut self, cookie: u64, bio: Bio, result: BioResult) {
        self.bio_done(cookie, bio, result);
    }

    fn saved(&mut self, cookie: u64, result: BioResult) {
        self.save_done(cookie, result);
    }

    fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        let first = *self.first_tick.get_or_insert(now_ms);
        if !self.login.done()
            && now_ms.saturating_sub(first) > LOGIN_TIMEOUT_MS
            && self.closing.is_none()
        {
            log::warn!("iscsi: login not completed in {LOGIN_TIMEOUT_MS} ms, connection dropped");
            self.timed_out = true;
            self.close(Close::Hard);
        }
        let stall = self.cfg.stall_timeout_ms;
        if stall > 0
            && self.tasks.bios_out() == 0
            && self.budget_held() > 0
            && now_ms.saturating_sub(self.last_move_ms) > stall
            && self.closing != Some(Close::Hard)
        {
            log::warn!("iscsi: connection holding pages moved nothing for {stall} ms, dropped");
            self.timed_out = true;
            self.close(Close::Hard);
        }
        self.tasks.retry(now_ms, &mut self.work);
        // A range another connection held may be free now.
        self.unblock();
    }

    fn input_closed(&mut self) {
        self.input_done = true;
        self.session_gone();
        self.tasks.input_closed();
        if self.closing.is_none() {
            self.closing = Some(Close::Soft);
        }
    }

    fn begin_shutdown(&mut self) {
        self.stopping = true;
    }

    fn shutdown(&mut self) {
        self.close(Close::Hard);
    }

    fn wants_recv(&self) -> bool {
        self.closing.is_none()
            && !self.input_done
            && !self.tasks.waiting_budget()
            && !self.tasks.full()
    }

    fn has_tx(&self) -> bool {
        self.closing != Some(Close::Hard) && !self.tx.is_empty()
    }

    fn is_finished(&self) -> bool {
        match self.closing {
            None => false,
            Some(Close::Hard) => self.tasks.bios_out() == 0,
            Some(Close::Soft) => {
                self.tasks.bios_out() == 0 && self.tasks.is_idle() && self.tx.is_empty()
            }
        }
    }

    fn counters(&self) -> &DataCounters {
        &self.counters
    }

    fn in_flight(&self) -> usize {
        self.tasks.bios_out()
    }

    fn requests_open(&self) -> usize {
        self.tasks.open()
    }

    fn budget_held(&self) -> u64 {
        self.tasks.held_bytes() + self.tx.page_bytes()
    }

    fn budget_wanted(&self) -> Option<u64> {
        self.tasks.wanted()
    }

    fn budget_grant(&mut self) -> bool {
        let ok = self.tasks.grant();
        if ok {
            self.after_grant();
        }
        ok
    }

    fn timed_out(&self) -> bool {
        self.timed_out
    }

    fn peer(&self) -> Option<Peer> {
        if !self.login.done() {
            return None;
        }
        let isid: String = self
            .login
            .isid
            .iter()
            .map(|b| alloc::format!("{b:02x}"))
            .collect();
        Some(Peer {
            client: self.login.initiator.clone(),
            export: self
                .login
                .target
                .clone()
                .unwrap_or_else(|| String::from("discovery")),
            session: alloc::format!("isid 0x{isid} tsih {}", self.login.tsih),
        })
    }
}

#[cfg(test)]
mod tests;
