//! A pipelined iSCSI initiator (RFC 7143) for the campaign's workload,
//! with the operations and the reply shape of [`super::client`]: a write
//! (with or without FUA) is a WRITE(16), a flush a SYNCHRONIZE CACHE(16),
//! a write of zeroes a WRITE SAME(16) without a Data-Out buffer, a read a
//! READ(16). A failed command answers an NBD-style error code, so the
//! ledger reads both protocols alike; a dropped connection ends the
//! reply stream with an error, as the NBD client's does.
//!
//! ```text
//!  caller ── send ──▶ queue ─(CmdSN ≤ MaxCmdSN)─▶ SCSI Command + immediate
//!                                                  and unsolicited data ─┐
//!                                                               writer ◀─┤
//!  reader ◀── Data-In (placed by offset), SCSI Response ── target        │
//!         ── R2T ──▶ Data-Out (≤ the target's segment, one burst) ───────┘
//!         ── NOP-In with a tag ──▶ NOP-Out
//! ```
//!
//! Login: security stage with `AuthMethod=None`, then the operational
//! stage (no digests, `InitialR2T`, `ImmediateData`, the segment and
//! burst lengths), then one session with one connection. Commands are
//! queued in the caller's thread and go out in CmdSN order while the
//! target's window is open; a reader thread takes every PDU from the
//! target, answers R2Ts and NOP-Ins itself and hands the caller one
//! [`Reply`] per command; a writer thread owns the socket's sending
//! side, so neither blocks the other.
//!
//! The cookie of a reply is the command's Initiator Task Tag.

use super::client::Reply;
use net::iscsi::pdu::{self, op, Bhs, BHS_LEN, NO_TAG};
use net::iscsi::text;
use net::nbd::wire::{
    Command, CMD_FLAG_FUA, TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA,
    TFLAG_SEND_WRITE_ZEROES,
};
use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// NBD's `EPERM`: the unit is write protected.
pub const EPERM: u32 = 1;
/// NBD's `EIO`: the command failed (CHECK CONDITION, a target failure, a
/// transfer that did not complete).
pub const EIO: u32 = 5;
/// NBD's `EINVAL`: the target found the command invalid (ILLEGAL REQUEST).
pub const EINVAL: u32 = 22;
/// NBD's `ENOSPC`: the unit ran out of space (DATA PROTECT, 27h/07h).
pub const ENOSPC: u32 = 28;

/// The initiator name the campaign logs in with.
pub const INITIATOR: &str = "iqn.2026-12.org.strata:fault";

/// The Asynchronous Message opcode (RFC 7143 §11.9).
const ASYNC_MSG: u8 = 0x32;

/// READ(16).
const READ_16: u8 = 0x88;
/// WRITE(16).
const WRITE_16: u8 = 0x8a;
/// SYNCHRONIZE CACHE(16).
const SYNC_CACHE_16: u8 = 0x91;
/// WRITE SAME(16).
const WRITE_SAME_16: u8 = 0x93;
/// SERVICE ACTION IN(16), whose action 10h is READ CAPACITY(16).
const SERVICE_ACTION_IN_16: u8 = 0x9e;

/// SCSI status GOOD.
const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
const CHECK_CONDITION: u8 = 0x02;

/// Longest data segment taken during login.
const LOGIN_DATA_MAX: usize = 64 * 1024;

/// How often the reader looks whether its initiator is gone while the
/// target is silent.
const POLL: Duration = Duration::from_millis(500);

/// What the initiator offers in the operational stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The initiator's name.
    pub initiator: String,
    /// MaxRecvDataSegmentLength it declares: the most data per PDU the
    /// target may send it.
    pub recv_segment: u32,
    /// MaxBurstLength it offers.
    pub max_burst: u32,
    /// FirstBurstLength it offers.
    pub first_burst: u32,
    /// InitialR2T it offers (`false`: unsolicited Data-Out wanted).
    pub initial_r2t: bool,
    /// ImmediateData it offers.
    pub immediate_data: bool,
}

impl Default for Settings {
    /// Small bursts, so a campaign write takes immediate data, then R2Ts,
    /// and a verifying read comes in several Data-In sequences.
    fn default() -> Self {
        Settings {
            initiator: INITIATOR.to_string(),
            recv_segment: 32 * 1024,
            max_burst: 32 * 1024,
            first_burst: 16 * 1024,
            initial_r2t: false,
            immediate_data: true,
        }
    }
}

/// What the login agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The target's MaxRecvDataSegmentLength: most data per PDU sent to it.
    pub target_segment: u32,
    /// MaxBurstLength: most data per R2T (and per Data-In sequence).
    pub max_burst: u32,
    /// FirstBurstLength: most unsolicited data per command.
    pub first_burst: u32,
    /// InitialR2T: no unsolicited Data-Out.
    pub initial_r2t: bool,
    /// ImmediateData: data may ride in the SCSI Command PDU.
    pub immediate_data: bool,
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    (u64::from(be32(b)) << 32) | u64::from(be32(&b[4..]))
}

/// Fills `buf`; a read timeout is retried until `give_up` says otherwise.
fn fill(r: &mut impl Read, buf: &mut [u8], give_up: &dyn Fn() -> bool) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if give_up() {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A PDU from the target: its header and its data segment (no padding).
#[derive(Clone, Debug)]
struct Pdu {
    bhs: Bhs,
    data: Vec<u8>,
}

/// Reads one PDU (no digests); its data segment may hold `max` bytes.
fn read_pdu(r: &mut impl Read, max: usize, give_up: &dyn Fn() -> bool) -> io::Result<Pdu> {
    let mut h = [0u8; BHS_LEN];
    fill(r, &mut h, give_up)?;
    let bhs = Bhs(h);
    let mut ahs = vec![0u8; bhs.ahs_len()];
    fill(r, &mut ahs, give_up)?;
    let len = bhs.data_len();
    if len > max {
        return Err(proto(format!(
            "a PDU (opcode {:#04x}) with {len} bytes of data, more than the {max} declared",
            bhs.opcode()
        )));
    }
    let mut data = vec![0u8; len + pdu::pad(len)];
    fill(r, &mut data, give_up)?;
    data.truncate(len);
    Ok(Pdu { bhs, data })
}

/// A PDU's bytes: header, data, padding.
fn pdu_bytes(mut h: [u8; BHS_LEN], data: &[u8]) -> Vec<u8> {
    pdu::set_data_len(&mut h, data.len());
    let mut v = Vec::with_capacity(BHS_LEN + data.len() + 3);
    v.extend_from_slice(&h);
    v.extend_from_slice(data);
    v.resize(v.len() + pdu::pad(data.len()), 0);
    v
}

/// The NBD-style error of a failed SCSI command: its status and sense
/// data (fixed or descriptor format, SPC-4 4.5).
pub fn scsi_error(status: u8, sense: &[u8]) -> u32 {
    if status != CHECK_CONDITION {
        return EIO;
    }
    let (key, asc, ascq) = match sense.first().map(|b| b & 0x7f) {
        Some(0x70 | 0x71) if sense.len() >= 14 => (sense[2] & 0x0f, sense[12], sense[13]),
        Some(0x72 | 0x73) if sense.len() >= 4 => (sense[1] & 0x0f, sense[2], sense[3]),
        _ => return EIO,
    };
    match (key, asc, ascq) {
        (0x07, 0x27, 0x07) => ENOSPC,
        (0x07, ..) => EPERM,
        (0x05, ..) => EINVAL,
        _ => EIO,
    }
}

/// One command until its status.
#[derive(Debug)]
struct Task {
    /// Its CDB.
    cdb: [u8; 16],
    /// Data-In expected.
    edtl_in: u32,
    /// Less Data-In than expected fails the command (a READ); else the
    /// data is what came (an INQUIRY, a MODE SENSE).
    exact: bool,
    /// Its Data-Out.
    out: Vec<u8>,
    /// The Data-In, placed by buffer offset.
    data: Vec<u8>,
    /// Data-In bytes placed (they come in order: DataPDUInOrder=Yes).
    got: u32,
    /// The next Data-In's DataSN.
    data_sn: u32,
    /// Why the transfer went wrong, if it did: the command fails.
    bad: Option<String>,
    /// Its SCSI Command PDU went out.
    sent: bool,
}

/// The session's state, shared by the caller and the reader.
struct State {
    n: Negotiated,
    lun: [u8; 8],
    /// The next command's CmdSN.
    cmd_sn: u32,
    /// The window's end, as the target last advanced it.
    max_cmd_sn: u32,
    /// The next StatSN expected.
    exp_stat_sn: u32,
    next_itt: u32,
    tasks: HashMap<u32, Task>,
    /// Tasks not sent yet: the window was closed.
    waiting: VecDeque<u32>,
    out: Sender<Vec<u8>>,
}

impl State {
    fn send(&self, h: [u8; BHS_LEN], data: &[u8]) {
        // A writer that is gone has shut the socket: the reader reports it.
        let _ = self.out.send(pdu_bytes(h, data));
    }

    /// A new Initiator Task Tag.
    fn itt(&mut self) -> u32 {
        loop {
            let t = self.next_itt;
            self.next_itt = self.next_itt.wrapping_add(1);
            if t != NO_TAG && !self.tasks.contains_key(&t) {
                return t;
            }
        }
    }

    /// Queues a command; it goes out when the window lets it.
    fn submit(&mut self, cdb: [u8; 16], edtl_in: u32, out: Vec<u8>) -> u32 {
        let itt = self.itt();
        self.tasks.insert(
            itt,
            Task {
                cdb,
                edtl_in,
                exact: cdb[0] == READ_16,
                out,
                data: vec![0; edtl_in as usize],
                got: 0,
                data_sn: 0,
                bad: None,
                sent: false,
            },
        );
        self.waiting.push_back(itt);
        self.pump();
        itt
    }

    /// Sends the queued commands the window has room for.
    fn pump(&mut self) {
        while pdu::sn_le(self.cmd_sn, self.max_cmd_sn) {
            let Some(itt) = self.waiting.pop_front() else {
                return;
            };
            self.issue(itt);
        }
    }

    /// The SCSI Command PDU of task `itt`, its immediate data and its
    /// unsolicited Data-Out.
    fn issue(&mut self, itt: u32) {
        let Some(t) = self.tasks.get_mut(&itt) else {
            return;
        };
        t.sent = true;
        let t = &self.tasks[&itt];
        let n = self.n;
        let edtl_out = t.out.len() as u32;
        let imm = if n.immediate_data {
            edtl_out.min(n.first_burst).min(n.target_segment)
        } else {
            0
        };
        let unsolicited = if n.initial_r2t {
            imm
        } else {
            edtl_out.min(n.first_burst)
        };
        let mut flags = 0x01; // SIMPLE
        if unsolicited == imm {
            flags |= 0x80;
        }
        if t.edtl_in > 0 {
            flags |= 0x40;
        }
        if edtl_out > 0 {
            flags |= 0x20;
        }
        let mut h = pdu::header(op::SCSI_CMD, flags);
        h[8..16].copy_from_slice(&self.lun);
        pdu::put32(&mut h, 16, itt);
        pdu::put32(&mut h, 20, t.edtl_in.max(edtl_out));
        pdu::put32(&mut h, 24, self.cmd_sn);
        pdu::put32(&mut h, 28, self.exp_stat_sn);
        h[32..48].copy_from_slice(&t.cdb);
        self.send(h, &t.out[..imm as usize]);
        if unsolicited > imm {
            self.data_out(itt, NO_TAG, imm, unsolicited - imm);
        }
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
    }

    /// One sequence of Data-Out PDUs of task `itt`: `len` bytes from
    /// `offset`, each PDU at most the target's segment.
    fn data_out(&self, itt: u32, ttt: u32, offset: u32, len: u32) {
        let Some(t) = self.tasks.get(&itt) else {
            return;
        };
        let seg = self.n.target_segment.max(512);
        let mut done = 0;
        let mut data_sn = 0;
        while done < len {
            let k = seg.min(len - done);
            let last = done + k == len;
            let mut h = pdu::header(op::DATA_OUT, if last { 0x80 } else { 0 });
            h[8..16].copy_from_slice(&self.lun);
            pdu::put32(&mut h, 16, itt);
            pdu::put32(&mut h, 20, ttt);
            pdu::put32(&mut h, 28, self.exp_stat_sn);
            pdu::put32(&mut h, 36, data_sn);
            pdu::put32(&mut h, 40, offset + done);
            let at = (offset + done) as usize;
            self.send(h, &t.out[at..at + k as usize]);
            done += k;
            data_sn += 1;
        }
    }

    /// ExpCmdSN and MaxCmdSN of a target PDU (RFC 7143 §4.2.2.1): the
    /// window only grows, and an impossible one is ignored.
    fn window(&mut self, b: &Bhs) {
        let (exp, max) = (b.u32_at(28), b.u32_at(32));
        if pdu::sn_lt(max, exp.wrapping_sub(1)) {
            return;
        }
        if pdu::sn_lt(self.max_cmd_sn, max) {
            self.max_cmd_sn = max;
        }
    }

    /// A StatSN seen; `advanced`: the PDU took it (a status), else it is
    /// the next one.
    fn stat(&mut self, stat_sn: u32, advanced: bool) {
        let next = if advanced {
            stat_sn.wrapping_add(1)
        } else {
            stat_sn
        };
        if pdu::sn_lt(self.exp_stat_sn, next) {
            self.exp_stat_sn = next;
        }
    }

    /// The end of task `itt` with SCSI status `status`.
    fn finish(&mut self, itt: u32, status: u8, sense: &[u8]) -> Option<Reply> {
        let t = self.tasks.remove(&itt)?;
        let error = if status != GOOD {
            scsi_error(status, sense)
        } else if t.bad.is_some() || (t.exact && t.got < t.edtl_in) {
            EIO
        } else {
            0
        };
        let mut data = if error == 0 { t.data } else { Vec::new() };
        data.truncate(t.got as usize);
        Some(Reply {
            cookie: u64::from(itt),
            error,
            data,
        })
    }

    /// One PDU from the target; a reply when a command ended. An error
    /// ends the connection: the target broke the protocol.
    fn handle(&mut self, p: Pdu) -> io::Result<Option<Reply>> {
        let b = p.bhs;
        let itt = b.itt();
        if matches!(b.opcode(), op::SCSI_RSP | op::DATA_IN | op::R2T)
            && !self.tasks.get(&itt).is_some_and(|t| t.sent)
        {
            return Err(proto(format!(
                "opcode {:#04x} for task {itt:#x}, which was not sent",
                b.opcode()
            )));
        }
        let reply = match b.opcode() {
            op::NOP_IN => {
                self.window(&b);
                self.stat(b.u32_at(24), itt != NO_TAG);
                let ttt = b.u32_at(20);
                if ttt != NO_TAG {
                    // A ping: answered at once, outside the window.
                    let mut h = pdu::header(0x40 | op::NOP_OUT, 0x80);
                    h[8..16].copy_from_slice(&b.lun_field());
                    pdu::put32(&mut h, 16, NO_TAG);
                    pdu::put32(&mut h, 20, ttt);
                    pdu::put32(&mut h, 24, self.cmd_sn);
                    pdu::put32(&mut h, 28, self.exp_stat_sn);
                    let k = p.data.len().min(self.n.target_segment as usize);
                    self.send(h, &p.data[..k]);
                }
                None
            }
            op::SCSI_RSP => {
                self.window(&b);
                self.stat(b.u32_at(24), true);
                if b.0[2] != 0 {
                    // The target failed the command (response code ≠ 0).
                    self.finish(itt, CHECK_CONDITION, &[])
                } else {
                    let sense = match p.data.len() {
                        n if n >= 2 => {
                            let k = usize::from(u16::from_be_bytes([p.data[0], p.data[1]]));
                            &p.data[2..(2 + k).min(n)]
                        }
                        _ => &[][..],
                    };
                    self.finish(itt, b.0[3], sense)
                }
            }
            op::DATA_IN => {
                self.window(&b);
                let Some(t) = self.tasks.get_mut(&itt) else {
                    return Err(proto(format!("Data-In for unknown task {itt:#x}")));
                };
                let (sn, off, len) = (b.u32_at(36), b.u32_at(40), p.data.len() as u32);
                if sn != t.data_sn {
                    t.bad = Some(format!("DataSN {sn}, {} expected", t.data_sn));
                } else if off != t.got || u64::from(off) + u64::from(len) > u64::from(t.edtl_in) {
                    t.bad = Some(format!(
                        "Data-In of {len} bytes at {off}: {} of {} placed",
                        t.got, t.edtl_in
                    ));
                } else {
                    t.data[off as usize..(off + len) as usize].copy_from_slice(&p.data);
                    t.got += len;
                }
                t.data_sn = t.data_sn.wrapping_add(1);
                if b.flags() & 0x01 != 0 {
                    self.stat(b.u32_at(24), true);
                    self.finish(itt, b.0[3], &[])
                } else {
                    None
                }
            }
            op::R2T => {
                self.window(&b);
                self.stat(b.u32_at(24), false);
                let Some(t) = self.tasks.get(&itt) else {
                    return Err(proto(format!("an R2T for unknown task {itt:#x}")));
                };
                let (ttt, off, len) = (b.u32_at(20), b.u32_at(40), b.u32_at(44));
                let end = u64::from(off) + u64::from(len);
                if ttt == NO_TAG || len == 0 || end > t.out.len() as u64 || len > self.n.max_burst {
                    return Err(proto(format!(
                        "an R2T for {len} bytes at {off} of a {}-byte write (MaxBurstLength {})",
                        t.out.len(),
                        self.n.max_burst
                    )));
                }
                self.data_out(itt, ttt, off, len);
                None
            }
            op::REJECT => {
                self.window(&b);
                self.stat(b.u32_at(24), true);
                if p.data.len() < BHS_LEN {
                    return Err(proto("a Reject without the rejected header"));
                }
                let mut h = [0u8; BHS_LEN];
                h.copy_from_slice(&p.data[..BHS_LEN]);
                let r = Bhs(h);
                let why = format!("rejected (reason {:#04x})", b.0[2]);
                if r.opcode() == op::SCSI_CMD {
                    self.finish(r.itt(), CHECK_CONDITION, &[])
                } else {
                    if let Some(t) = self.tasks.get_mut(&r.itt()) {
                        t.bad = Some(why);
                    }
                    None
                }
            }
            ASYNC_MSG | op::LOGOUT_RSP | op::TMF_RSP | op::TEXT_RSP => {
                self.window(&b);
                self.stat(b.u32_at(24), true);
                None
            }
            other => return Err(proto(format!("unexpected opcode {other:#04x}"))),
        };
        self.pump();
        Ok(reply)
    }
}

/// What the caller and the threads share.
struct Shared {
    st: Mutex<State>,
    /// The initiator is gone: the reader stops.
    stop: AtomicBool,
    /// The reader or the writer ended: the connection is over.
    dead: AtomicBool,
    /// The Logout Response came.
    logged_out: AtomicBool,
}

/// A logged-in session over one connection.
pub struct Initiator {
    shared: Arc<Shared>,
    replies: Receiver<io::Result<Reply>>,
    sock: TcpStream,
    /// The LUN's size in bytes.
    pub size: u64,
    /// NBD transmission flags describing what it takes (flush, FUA,
    /// write zeroes; read-only when write protected).
    pub flags: u16,
    /// Its logical block size.
    pub block_size: u32,
    /// What the login agreed on.
    pub negotiated: Negotiated,
}

/// The session identifiers of one login.
struct Login {
    n: Negotiated,
    cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
}

/// A per-process count, so each login has an ISID of its own.
static LOGINS: AtomicU32 = AtomicU32::new(0);

/// `IQN` or `IQN/LUN` → (IQN, LUN).
pub fn parse_target(s: &str) -> (&str, u64) {
    match s.rsplit_once('/') {
        Some((iqn, lun)) if !iqn.is_empty() => match lun.parse() {
            Ok(l) => (iqn, l),
            Err(_) => (s, 0),
        },
        _ => (s, 0),
    }
}

/// The operational keys of `s`.
fn operational_keys(s: &Settings) -> Vec<u8> {
    let yn = |b: bool| if b { "Yes" } else { "No" };
    let mut k = Vec::new();
    text::push(&mut k, "HeaderDigest", "None");
    text::push(&mut k, "DataDigest", "None");
    text::push(&mut k, "InitialR2T", yn(s.initial_r2t));
    text::push(&mut k, "ImmediateData", yn(s.immediate_data));
    text::push(
        &mut k,
        "MaxRecvDataSegmentLength",
        &s.recv_segment.to_string(),
    );
    text::push(&mut k, "MaxBurstLength", &s.max_burst.to_string());
    text::push(&mut k, "FirstBurstLength", &s.first_burst.to_string());
    text::push(&mut k, "MaxOutstandingR2T", "1");
    text::push(&mut k, "ErrorRecoveryLevel", "0");
    k
}

/// The target's answers to the operational keys, over the defaults of
/// RFC 7143 §13 and what was offered.
#[derive(Default)]
struct Answers {
    segment: Option<u32>,
    max_burst: Option<u32>,
    first_burst: Option<u32>,
    initial_r2t: Option<bool>,
    immediate_data: Option<bool>,
}

impl Answers {
    fn take(&mut self, key: &str, value: &str) -> io::Result<()> {
        let num = |lo: u64| {
            text::number(value)
                .filter(|n| (lo..=16_777_215).contains(n))
                .map(|n| n as u32)
                .ok_or_else(|| proto(format!("the target answered {key}={value}")))
        };
        match key {
            "HeaderDigest" | "DataDigest" if value != "None" => {
                return Err(proto(format!("the target wants {key}={value}")));
            }
            "MaxRecvDataSegmentLength" => self.segment = Some(num(512)?),
            "MaxBurstLength" if value != "Irrelevant" => self.max_burst = Some(num(512)?),
            "FirstBurstLength" if value != "Irrelevant" => self.first_burst = Some(num(512)?),
            "InitialR2T" => self.initial_r2t = text::boolean(value),
            "ImmediateData" => self.immediate_data = text::boolean(value),
            _ => {}
        }
        Ok(())
    }

    fn result(&self, s: &Settings) -> Negotiated {
        let max_burst = s.max_burst.min(self.max_burst.unwrap_or(262_144));
        Negotiated {
            target_segment: self.segment.unwrap_or(8192),
            max_burst,
            first_burst: s
                .first_burst
                .min(self.first_burst.unwrap_or(65_536))
                .min(max_burst),
            // OR and AND of the offer and the answer (RFC 7143 §13.10, §13.11).
            initial_r2t: s.initial_r2t || self.initial_r2t.unwrap_or(true),
            immediate_data: s.immediate_data && self.immediate_data.unwrap_or(true),
        }
    }
}

/// Logs in to `iqn` as a normal session (each read bounded by the
/// socket's timeout).
fn login(s: &mut TcpStream, iqn: &str, set: &Settings) -> io::Result<Login> {
    let count = LOGINS.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    // ISID: random format (T=10b), qualifiers from the process and the count.
    let isid = [
        0x80,
        (pid >> 8) as u8,
        pid as u8,
        (count >> 16) as u8,
        (count >> 8) as u8,
        count as u8,
    ];
    let (itt, cmd_sn) = (0u32, 1u32);
    let mut exp_stat_sn = 0u32;
    let mut stage = 0u8;
    let mut keys = Vec::new();
    text::push(&mut keys, "InitiatorName", &set.initiator);
    text::push(&mut keys, "SessionType", "Normal");
    text::push(&mut keys, "TargetName", iqn);
    text::push(&mut keys, "AuthMethod", "None");
    let mut answers = Answers::default();
    let mut gathered = Vec::new();
    let mut more = false;
    for _ in 0..16 {
        let next = if stage == 0 { 1 } else { 3 };
        let flags = if more { 0 } else { 0x80 | next } | (stage << 2);
        let mut h = pdu::header(0x40 | op::LOGIN_REQ, flags);
        h[8..14].copy_from_slice(&isid);
        pdu::put32(&mut h, 16, itt);
        pdu::put32(&mut h, 24, cmd_sn);
        pdu::put32(&mut h, 28, exp_stat_sn);
        s.write_all(&pdu_bytes(h, &keys))?;
        keys.clear();
        let r = read_pdu(s, LOGIN_DATA_MAX, &|| true)?;
        let b = r.bhs;
        if b.opcode() != op::LOGIN_RSP {
            return Err(proto(format!(
                "answered the login with opcode {:#04x}",
                b.opcode()
            )));
        }
        if b.0[36] != 0 {
            return Err(io::Error::other(format!(
                "login to {iqn} refused: status class {:#04x}, detail {:#04x}",
                b.0[36], b.0[37]
            )));
        }
        exp_stat_sn = b.u32_at(24).wrapping_add(1);
        if gathered.len() + r.data.len() > LOGIN_DATA_MAX {
            return Err(proto("too much login text"));
        }
        gathered.extend_from_slice(&r.data);
        more = b.flags() & 0x40 != 0;
        if more {
            continue;
        }
        let pairs = text::parse(&gathered).map_err(|_| proto("malformed login keys"))?;
        gathered.clear();
        for (k, v) in &pairs {
            if stage == 0 && k == "AuthMethod" && v != "None" {
                return Err(io::Error::other(format!("the target wants AuthMethod={v}")));
            }
            if stage == 1 {
                answers.take(k, v)?;
            }
        }
        let rsp_csg = (b.flags() >> 2) & 3;
        if rsp_csg != stage {
            return Err(proto(format!(
                "a login response in stage {rsp_csg}, {stage} expected"
            )));
        }
        if b.flags() & 0x80 != 0 && b.flags() & 3 == next {
            stage = next;
            if stage == 3 {
                return Ok(Login {
                    n: answers.result(set),
                    cmd_sn: b.u32_at(28),
                    max_cmd_sn: b.u32_at(32),
                    exp_stat_sn,
                });
            }
            keys = operational_keys(set);
        }
    }
    Err(proto("the login did not reach the full feature phase"))
}

/// A CDB with a 64-bit LBA at 2 and a 32-bit length at 10 (the 16-byte
/// SBC commands).
fn cdb16(opcode: u8, flags: u8, lba: u64, n: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}

impl Initiator {
    /// Connects to `addr` and logs in to `target` (`IQN` or `IQN/LUN`)
    /// with the default [`Settings`]; every step is bounded by `timeout`.
    pub fn connect(addr: SocketAddr, target: &str, timeout: Duration) -> io::Result<Initiator> {
        Self::connect_with(addr, target, &Settings::default(), timeout)
    }

    /// Connects with `settings`, logs in, and reads the LUN's capacity
    /// and write protection; every step is bounded by `timeout`.
    pub fn connect_with(
        addr: SocketAddr,
        target: &str,
        settings: &Settings,
        timeout: Duration,
    ) -> io::Result<Initiator> {
        let (iqn, lun) = parse_target(target);
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let l = login(&mut s, iqn, settings)?;
        s.set_read_timeout(Some(POLL))?;
        let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>();
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                n: l.n,
                lun: pdu::encode_lun(lun),
                cmd_sn: l.cmd_sn,
                max_cmd_sn: l.max_cmd_sn,
                exp_stat_sn: l.exp_stat_sn,
                next_itt: 1,
                tasks: HashMap::new(),
                waiting: VecDeque::new(),
                out: out_tx,
            }),
            stop: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            logged_out: AtomicBool::new(false),
        });
        let w = s.try_clone()?;
        let sh = shared.clone();
        thread::spawn(move || {
            let mut w = BufWriter::with_capacity(256 << 10, w);
            while let Ok(first) = out_rx.recv() {
                let mut ok = w.write_all(&first).is_ok();
                while ok {
                    match out_rx.try_recv() {
                        Ok(p) => ok = w.write_all(&p).is_ok(),
                        Err(_) => break,
                    }
                }
                if !(ok && w.flush().is_ok()) {
                    sh.dead.store(true, Ordering::Relaxed);
                    let _ = w.get_ref().shutdown(Shutdown::Both);
                    return;
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        let r = s.try_clone()?;
        let sh = shared.clone();
        let max = settings.recv_segment as usize;
        thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 20, r);
            let give_up = || sh.stop.load(Ordering::Relaxed);
            loop {
                let got = read_pdu(&mut r, max, &give_up).and_then(|p| {
                    if p.bhs.opcode() == op::LOGOUT_RSP {
                        sh.logged_out.store(true, Ordering::Relaxed);
                    }
                    lock(&sh.st).handle(p)
                });
                let end = match got {
                    Ok(None) => continue,
                    Ok(Some(reply)) => tx.send(Ok(reply)).is_err(),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        true
                    }
                };
                if end {
                    sh.dead.store(true, Ordering::Relaxed);
                    let _ = r.get_ref().shutdown(Shutdown::Both);
                    return;
                }
            }
        });
        let mut c = Initiator {
            shared,
            replies: rx,
            sock: s,
            size: 0,
            flags: 0,
            block_size: 0,
            negotiated: l.n,
        };
        // READ CAPACITY(16); a unit attention may answer the first commands.
        let mut cap = Err(io::Error::other("no READ CAPACITY"));
        for _ in 0..3 {
            cap = c.wait(cdb16(SERVICE_ACTION_IN_16, 0x10, 0, 32), 32, timeout);
            if cap.is_ok() {
                break;
            }
        }
        let cap = cap?;
        if cap.len() < 12 {
            return Err(proto("a short READ CAPACITY(16) answer"));
        }
        let bs = be32(&cap[8..]);
        if !bs.is_power_of_two() || !(512..=1 << 20).contains(&bs) {
            return Err(proto(format!("a logical block of {bs} bytes")));
        }
        c.block_size = bs;
        c.size = be64(&cap)
            .checked_add(1)
            .and_then(|n| n.checked_mul(u64::from(bs)))
            .ok_or_else(|| proto("a capacity past 2^64 bytes"))?;
        // MODE SENSE(6), DBD, all pages: the header's WP bit.
        let mut ms = [0u8; 16];
        ms[..6].copy_from_slice(&[0x1a, 0x08, 0x3f, 0, 0xff, 0]);
        let wp = c
            .wait(ms, 255, timeout)
            .is_ok_and(|h| h.len() >= 4 && h[2] & 0x80 != 0);
        c.flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_WRITE_ZEROES;
        if wp {
            c.flags |= TFLAG_READ_ONLY;
        }
        Ok(c)
    }

    /// Runs one command and waits (up to `timeout`) for its Data-In.
    fn wait(&mut self, cdb: [u8; 16], edtl_in: u32, timeout: Duration) -> io::Result<Vec<u8>> {
        let itt = u64::from(self.submit(cdb, edtl_in, Vec::new())?);
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer to opcode {:#04x}", cdb[0]),
                ));
            }
            match self.recv(left)? {
                Some(r) if r.cookie == itt && r.error == 0 => return Ok(r.data),
                Some(r) if r.cookie == itt => {
                    return Err(io::Error::other(format!(
                        "opcode {:#04x} failed (error {})",
                        cdb[0], r.error
                    )))
                }
                _ => {}
            }
        }
    }

    fn submit(&mut self, cdb: [u8; 16], edtl_in: u32, out: Vec<u8>) -> io::Result<u32> {
        if self.shared.dead.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::ConnectionAborted.into());
        }
        Ok(lock(&self.shared.st).submit(cdb, edtl_in, out))
    }

    /// Sends one request; returns its cookie. `data` is a write's payload.
    /// Offsets and lengths are in bytes, whole logical blocks.
    pub fn send(
        &mut self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        let bs = u64::from(self.block_size.max(1));
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        if !offset.is_multiple_of(bs) || !u64::from(len).is_multiple_of(bs) {
            return Err(invalid("not whole logical blocks"));
        }
        let (lba, n) = (offset / bs, (u64::from(len) / bs) as u32);
        let fua = if flags & CMD_FLAG_FUA != 0 { 0x08 } else { 0 };
        let itt = match cmd {
            Command::Read => self.submit(cdb16(READ_16, 0, lba, n), len, Vec::new())?,
            Command::Write => {
                if data.len() != len as usize {
                    return Err(invalid("a write's payload is not its length"));
                }
                self.submit(cdb16(WRITE_16, fua, lba, n), 0, data.to_vec())?
            }
            Command::Flush => self.submit(cdb16(SYNC_CACHE_16, 0, 0, 0), 0, Vec::new())?,
            Command::WriteZeroes => {
                if n == 0 {
                    // A WRITE SAME of no blocks runs to the end of the unit.
                    return Err(invalid("a write of no zeroes"));
                }
                // NDOB: no Data-Out buffer, the blocks become zeroes.
                self.submit(cdb16(WRITE_SAME_16, 0x01, lba, n), 0, Vec::new())?
            }
            _ => return Err(io::ErrorKind::Unsupported.into()),
        };
        Ok(u64::from(itt))
    }

    /// The next reply, waiting at most `wait` (`Ok(None)`: none yet).
    pub fn recv(&mut self, wait: Duration) -> io::Result<Option<Reply>> {
        match self.replies.recv_timeout(wait) {
            Ok(r) => r.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(io::ErrorKind::ConnectionAborted.into()),
        }
    }

    /// Logs out (waiting a moment for the answer) and closes.
    pub fn disconnect(self) {
        {
            let mut st = lock(&self.shared.st);
            let itt = st.itt();
            let mut h = pdu::header(0x40 | op::LOGOUT_REQ, 0x80);
            pdu::put32(&mut h, 16, itt);
            pdu::put32(&mut h, 24, st.cmd_sn);
            pdu::put32(&mut h, 28, st.exp_stat_sn);
            st.send(h, &[]);
        }
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until
            && !self.shared.logged_out.load(Ordering::Relaxed)
            && !self.shared.dead.load(Ordering::Relaxed)
        {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Initiator {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests;
