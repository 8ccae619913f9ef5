//! The login phase (RFC 7143 §6.3, §11.12–11.13): the security stage
//! (AuthMethod, CHAP), the operational stage (the keys of [`Params`]),
//! the session's identity (initiator, ISID, TSIH, target); and the text
//! requests of the full-feature phase (SendTargets, renegotiation).

use super::{Close, Connection};
use crate::iscsi::pdu::{self, op, Bhs};
use crate::iscsi::text::{self, Answer, TEXT_MAX};
use crate::session::ExportInfo;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU16, Ordering};

/// TSIHs handed out; never 0.
static NEXT_TSIH: AtomicU16 = AtomicU16::new(1);

/// Login status (class, detail), RFC 7143 §11.13.5.
pub(super) mod status {
    /// Initiator error (a malformed or unacceptable request).
    pub const INITIATOR_ERROR: u16 = 0x0200;
    /// Authentication failure.
    pub const AUTH_FAILED: u16 = 0x0201;
    /// Authorization failure.
    pub const FORBIDDEN: u16 = 0x0202;
    /// Target not found.
    pub const NOT_FOUND: u16 = 0x0203;
    /// Unsupported version.
    pub const BAD_VERSION: u16 = 0x0205;
    /// Missing parameter.
    pub const MISSING: u16 = 0x0207;
    /// Session type not supported.
    pub const BAD_SESSION_TYPE: u16 = 0x0209;
    /// Session does not exist.
    pub const NO_SESSION: u16 = 0x020a;
    /// Target error.
    pub const TARGET_ERROR: u16 = 0x0300;
}

/// One target as the exports describe it: its IQN, its LUNs with their
/// export indices.
pub(super) struct TargetView<'a> {
    /// The IQN.
    pub iqn: &'a str,
    /// (LUN, export index), in export order.
    pub luns: Vec<(u64, usize)>,
}

/// The targets in an export list whose names are `IQN/LUN`.
pub(super) fn targets(exports: &[ExportInfo]) -> Vec<TargetView<'_>> {
    let mut out: Vec<TargetView<'_>> = Vec::new();
    for (i, e) in exports.iter().enumerate() {
        let Some((iqn, lun)) = e.name.rsplit_once('/') else {
            continue;
        };
        let Ok(lun) = lun.parse::<u64>() else {
            continue;
        };
        match out.iter_mut().find(|t| t.iqn == iqn) {
            Some(t) => t.luns.push((lun, i)),
            None => out.push(TargetView {
                iqn,
                luns: alloc::vec![(lun, i)],
            }),
        }
    }
    out
}

/// Where a CHAP exchange is (RFC 7143 §12.1.3).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Chap {
    /// Not chosen.
    Off,
    /// AuthMethod=CHAP agreed: CHAP_A is next.
    WaitAlgorithm,
    /// The challenge went out: CHAP_N and CHAP_R are next.
    WaitResponse {
        id: u8,
        challenge: [u8; CHALLENGE_LEN],
    },
}

/// Bytes of a CHAP challenge.
const CHALLENGE_LEN: usize = 16;

/// CHAP's response: MD5 over the identifier, the secret and the
/// challenge (RFC 1994).
fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// A CHAP binary value: `0x` and hex digits (`0b` base64 is not taken).
fn chap_binary(v: &str) -> Option<Vec<u8>> {
    let h = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"))?;
    if h.is_empty() || h.len() % 2 != 0 || h.len() > 2048 {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
        .collect()
}

fn hex(b: &[u8]) -> String {
    let mut s = String::from("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Where the login is.
pub(super) struct LoginState {
    /// Stage the next request must be in (0 security, 1 operational).
    stage: u8,
    /// The first request has been seen.
    started: bool,
    /// The session is in the full-feature phase.
    complete: bool,
    /// A response refused the login: nothing more is read.
    failed: bool,
    /// Text of requests with the C bit, gathered.
    text: Vec<u8>,
    /// The target declared its MaxRecvDataSegmentLength.
    declared_segment: bool,
    /// TargetPortalGroupTag was sent.
    sent_tpgt: bool,
    /// Authentication is over (None agreed, or CHAP passed).
    auth_done: bool,
    /// Where CHAP is.
    chap: Chap,
    /// The initiator's name.
    pub initiator: String,
    /// Its ISID.
    pub isid: [u8; 6],
    /// The TSIH given at the end.
    pub tsih: u16,
    /// The target (None: a discovery session).
    pub target: Option<String>,
    /// A discovery session.
    pub discovery: bool,
    /// SendTargets output not yet sent (continued text responses).
    pub text_rest: Vec<u8>,
}

impl LoginState {
    /// Before the first request.
    pub fn new() -> LoginState {
        LoginState {
            stage: 0,
            started: false,
            complete: false,
            failed: false,
            text: Vec::new(),
            declared_segment: false,
            sent_tpgt: false,
            auth_done: false,
            chap: Chap::Off,
            initiator: String::new(),
            isid: [0; 6],
            tsih: 0,
            target: None,
            discovery: false,
            text_rest: Vec::new(),
        }
    }

    /// True in the full-feature phase.
    pub fn done(&self) -> bool {
        self.complete
    }
}

impl Connection {
    /// One Login Request PDU.
    pub(super) fn login_request(&mut self, exports: &[ExportInfo], bhs: &Bhs, data: &[u8]) {
        if self.login.failed {
            return;
        }
        let flags = bhs.flags();
        let (transit, cont) = (flags & 0x80 != 0, flags & 0x40 != 0);
        let (csg, nsg) = ((flags >> 2) & 3, flags & 3);
        if !self.login.started {
            self.login.started = true;
            self.login.isid.copy_from_slice(&bhs.0[8..14]);
            self.tasks.start_cmd_sn(bhs.cmd_sn());
            if bhs.0[3] > 0 {
                return self.login_fail(bhs, "unsupported version", status::BAD_VERSION);
            }
            // An initiator with nothing to authenticate may start in the
            // operational stage.
            if csg == 1 {
                self.login.stage = 1;
            }
            if bhs.u16_at(14) != 0 {
                // Adding a connection to a session (MaxConnections is 1).
                return self.login_fail(
                    bhs,
                    "adding a connection to a session",
                    status::NO_SESSION,
                );
            }
        }
        if csg != self.login.stage || (transit && cont) || (transit && nsg <= csg) || nsg == 2 {
            return self.login_fail(bhs, "bad stage transition", status::INITIATOR_ERROR);
        }
        if self.login.text.len() + data.len() > TEXT_MAX {
            return self.login_fail(bhs, "too much login text", status::INITIATOR_ERROR);
        }
        self.login.text.extend_from_slice(data);
        if cont {
            // More text follows: an empty response asks for it.
            return self.login_respond(bhs, 0, false, csg, 0, Vec::new());
        }
        let text = core::mem::take(&mut self.login.text);
        let Ok(keys) = text::parse(&text) else {
            return self.login_fail(bhs, "malformed keys", status::INITIATOR_ERROR);
        };
        let mut out = Vec::new();
        let mut auth_offer: Option<&str> = None;
        let mut chap_keys: Vec<(&str, &str)> = Vec::new();
        for (k, v) in &keys {
            match k.as_str() {
                "InitiatorName" => self.login.initiator = v.clone(),
                "InitiatorAlias" => {}
                "TargetName" => self.login.target = Some(v.clone()),
                "SessionType" => match v.as_str() {
                    "Normal" => self.login.discovery = false,
                    "Discovery" => self.login.discovery = true,
                    _ => {
                        return self.login_fail(
                            bhs,
                            "unknown session type",
                            status::BAD_SESSION_TYPE,
                        )
                    }
                },
                "AuthMethod" => auth_offer = Some(v.as_str()),
                "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" if csg == 0 => {
                    chap_keys.push((k.as_str(), v.as_str()))
                }
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => {
                    text::push(&mut out, k, "Irrelevant")
                }
                _ => {
                    let disc = self.login.discovery;
                    match self.params.offer(k, v, &self.cfg.limits, disc) {
                        Some(Answer::Reply(r)) => text::push(&mut out, k, &r),
                        Some(Answer::Quiet) => {}
                        Some(Answer::Refuse) => {
                            log::warn!("iscsi: login key {k}={v} not acceptable");
                            return self.login_fail(
                                bhs,
                                "unacceptable value",
                                status::INITIATOR_ERROR,
                            );
                        }
                        None => text::push(&mut out, k, "NotUnderstood"),
                    }
                }
            }
        }
        if self.login.initiator.is_empty() {
            return self.login_fail(bhs, "no InitiatorName", status::MISSING);
        }
        if self.login.discovery {
            self.login.target = None;
        } else {
            let Some(name) = self.login.target.clone() else {
                return self.login_fail(bhs, "no TargetName", status::MISSING);
            };
            let ts = targets(exports);
            let Some(t) = ts.iter().find(|t| t.iqn == name) else {
                log::info!(
                    "iscsi: login of {} to unknown target {name}",
                    self.login.initiator
                );
                return self.login_fail(bhs, "unknown target", status::NOT_FOUND);
            };
            let access = t
                .luns
                .first()
                .and_then(|&(_, i)| exports.get(i))
                .map(|e| e.access.clone());
            let access = access.unwrap_or_default();
            if !access.allows_initiator(&self.login.initiator) {
                log::info!("iscsi: {} may not log in to {name}", self.login.initiator);
                return self.login_fail(bhs, "initiator not allowed", status::FORBIDDEN);
            }
            if !self.login.sent_tpgt {
                self.login.sent_tpgt = true;
                text::push(&mut out, "TargetPortalGroupTag", "1");
            }
            if csg == 0 {
                if let Err(code) = self.security(&access, auth_offer, &chap_keys, &mut out) {
                    return self.login_fail(bhs, "authentication failed", code);
                }
            }
        }
        if csg == 0 && self.login.discovery {
            // Discovery sessions are open; SendTargets lists only what the
            // initiator may reach.
            match auth_offer {
                Some(offer) if offer.split(',').any(|m| m == "None") => {
                    text::push(&mut out, "AuthMethod", "None");
                    self.login.auth_done = true;
                }
                Some(_) => text::push(&mut out, "AuthMethod", "Reject"),
                None => self.login.auth_done = true,
            }
        }
        if csg == 1 && !self.login.auth_done {
            // The security stage was skipped: only a target without CHAP
            // takes that.
            let chap = self.login.target.as_deref().is_some_and(|name| {
                let ts = targets(exports);
                ts.iter()
                    .find(|t| t.iqn == name)
                    .and_then(|t| t.luns.first())
                    .and_then(|&(_, i)| exports.get(i))
                    .is_some_and(|e| e.access.chap.is_some())
            });
            if chap {
                return self.login_fail(bhs, "the target requires CHAP", status::AUTH_FAILED);
            }
            self.login.auth_done = true;
        }
        // While CHAP goes on, the target holds the initiator in the
        // security stage (T=0 in the response).
        let mut transit = transit;
        if csg == 0 && transit && !self.login.auth_done {
            if self.login.chap == Chap::Off {
                return self.login_fail(bhs, "authentication not done", status::AUTH_FAILED);
            }
            transit = false;
        }
        if csg == 1 && !self.login.declared_segment {
            self.login.declared_segment = true;
            let n = format!("{}", self.cfg.limits.recv_segment);
            text::push(&mut out, "MaxRecvDataSegmentLength", &n);
        }
        if transit {
            self.login.stage = nsg;
        }
        let finish = transit && nsg == 3;
        if finish {
            let mut t = NEXT_TSIH.fetch_add(1, Ordering::Relaxed);
            if t == 0 {
                t = NEXT_TSIH.fetch_add(1, Ordering::Relaxed);
            }
            self.login.tsih = t;
            self.params.recv_segment = if self.login.declared_segment {
                self.cfg.limits.recv_segment
            } else {
                8192
            };
        }
        self.login_respond(bhs, 0, transit, csg, if transit { nsg } else { 0 }, out);
        if finish {
            self.login.complete = true;
            let target = self.login.target.clone();
            self.tasks.bind(
                exports,
                target.as_deref(),
                &self.login.initiator,
                self.login.isid,
            );
            log::info!(
                "iscsi: {} logged in to {}",
                self.login.initiator,
                target.as_deref().unwrap_or("discovery")
            );
        }
    }

    /// The security stage of a normal session: AuthMethod, then CHAP's
    /// steps when the target asks for it. Err: the login fails so.
    fn security(
        &mut self,
        access: &crate::session::ExportAccess,
        offer: Option<&str>,
        keys: &[(&str, &str)],
        out: &mut Vec<u8>,
    ) -> Result<(), u16> {
        let get = |k: &str| keys.iter().find(|(a, _)| *a == k).map(|(_, v)| *v);
        let Some((user, secret)) = access.chap.as_ref() else {
            match offer {
                Some(o) if o.split(',').any(|m| m == "None") => {
                    text::push(out, "AuthMethod", "None");
                    self.login.auth_done = true;
                }
                Some(_) => text::push(out, "AuthMethod", "Reject"),
                None => self.login.auth_done = true,
            }
            return Ok(());
        };
        if let Some(o) = offer {
            if !o.split(',').any(|m| m == "CHAP") {
                log::info!(
                    "iscsi: {} offers no CHAP, which the target requires",
                    self.login.initiator
                );
                return Err(status::AUTH_FAILED);
            }
            text::push(out, "AuthMethod", "CHAP");
            self.login.chap = Chap::WaitAlgorithm;
        }
        match self.login.chap.clone() {
            Chap::Off => Err(status::AUTH_FAILED),
            Chap::WaitAlgorithm => {
                let Some(a) = get("CHAP_A") else {
                    return if offer.is_some() {
                        Ok(())
                    } else {
                        Err(status::AUTH_FAILED)
                    };
                };
                if !a.split(',').any(|x| x == "5") {
                    return Err(status::AUTH_FAILED);
                }
                let mut c = [0u8; CHALLENGE_LEN + 1];
                if self.rng.fill(&mut c).is_err() {
                    log::warn!("iscsi: no entropy for a CHAP challenge: login refused");
                    return Err(status::TARGET_ERROR);
                }
                let id = c[0];
                let mut challenge = [0u8; CHALLENGE_LEN];
                challenge.copy_from_slice(&c[1..]);
                text::push(out, "CHAP_A", "5");
                text::push(out, "CHAP_I", &format!("{id}"));
                text::push(out, "CHAP_C", &hex(&challenge));
                self.login.chap = Chap::WaitResponse { id, challenge };
                Ok(())
            }
            Chap::WaitResponse { id, challenge } => {
                let (Some(n), Some(r)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return Err(status::AUTH_FAILED);
                };
                let expect = chap_response(id, secret.as_bytes(), &challenge);
                let ok = n == user && chap_binary(r).is_some_and(|r| r[..] == expect[..]);
                if !ok {
                    log::info!("iscsi: CHAP failed for {} as {n}", self.login.initiator);
                    return Err(status::AUTH_FAILED);
                }
                // Mutual: the initiator challenges the target in turn.
                match (get("CHAP_I"), get("CHAP_C")) {
                    (None, None) => {}
                    (Some(i), Some(c)) => {
                        let Some((tuser, tsecret)) = access.mutual.as_ref() else {
                            return Err(status::AUTH_FAILED);
                        };
                        let i = text::number(i)
                            .filter(|&i| i <= 255)
                            .ok_or(status::AUTH_FAILED)?;
                        let c = chap_binary(c).ok_or(status::AUTH_FAILED)?;
                        // A reflected challenge would have the target answer
                        // its own question.
                        if c[..] == challenge[..] {
                            return Err(status::AUTH_FAILED);
                        }
                        let resp = chap_response(i as u8, tsecret.as_bytes(), &c);
                        text::push(out, "CHAP_N", tuser);
                        text::push(out, "CHAP_R", &hex(&resp));
                    }
                    _ => return Err(status::AUTH_FAILED),
                }
                self.login.auth_done = true;
                self.login.chap = Chap::Off;
                Ok(())
            }
        }
    }

    /// Refuses the login with `code`; the connection ends once it is sent.
    fn login_fail(&mut self, bhs: &Bhs, why: &str, code: u16) {
        log::warn!(
            "iscsi: login of '{}' refused ({why}): status {code:#06x}",
            self.login.initiator
        );
        self.login.failed = true;
        let csg = (bhs.flags() >> 2) & 3;
        self.login_respond(bhs, code, false, csg, 0, Vec::new());
        self.close(Close::Soft);
    }

    /// Queues a Login Response.
    fn login_respond(
        &mut self,
        bhs: &Bhs,
        code: u16,
        transit: bool,
        csg: u8,
        nsg: u8,
        data: Vec<u8>,
    ) {
        let flags = if transit { 0x80 } else { 0 } | (csg << 2) | nsg;
        let mut h = pdu::header(op::LOGIN_RSP, flags);
        h[2] = 0;
        h[3] = 0;
        h[8..14].copy_from_slice(&bhs.0[8..14]);
        let tsih = if transit && nsg == 3 {
            self.login.tsih
        } else {
            0
        };
        pdu::put16(&mut h, 14, tsih);
        pdu::put32(&mut h, 16, bhs.itt());
        h[36] = (code >> 8) as u8;
        h[37] = code as u8;
        self.send_status(h, data);
    }

    /// A Text Request in the full-feature phase: SendTargets, or keys to
    /// renegotiate.
    pub(super) fn text_request(&mut self, exports: &[ExportInfo], bhs: &Bhs, data: &[u8]) {
        if !bhs.immediate() && !self.tasks.take_cmd_sn(bhs.cmd_sn()) {
            return;
        }
        let ttt = bhs.u32_at(20);
        if ttt != pdu::NO_TAG && !self.login.text_rest.is_empty() {
            return self.text_respond(bhs);
        }
        self.login.text_rest.clear();
        let Ok(keys) = text::parse(data) else {
            return self.reject(bhs, pdu::reject::PROTOCOL);
        };
        let mut out = Vec::new();
        for (k, v) in &keys {
            if k == "SendTargets" {
                let ts = targets(exports);
                for t in ts.iter().filter(|t| self.send_target(t.iqn, v)) {
                    text::push(&mut out, "TargetName", t.iqn);
                    if let Some((ip, port)) = self.cfg.portal {
                        let a = format!("{}.{}.{}.{}:{port},1", ip[0], ip[1], ip[2], ip[3]);
                        text::push(&mut out, "TargetAddress", &a);
                    }
                }
                continue;
            }
            let disc = self.login.discovery;
            match self.params.offer(k, v, &self.cfg.limits, disc) {
                Some(Answer::Reply(r)) => text::push(&mut out, k, &r),
                Some(Answer::Quiet) => {}
                Some(Answer::Refuse) => text::push(&mut out, k, "Reject"),
                None => text::push(&mut out, k, "NotUnderstood"),
            }
        }
        self.login.text_rest = out;
        self.text_respond(bhs);
    }

    /// Whether SendTargets=`which` lists `iqn`.
    fn send_target(&self, iqn: &str, which: &str) -> bool {
        match which {
            "All" => self.login.discovery,
            "" => self.login.target.as_deref() == Some(iqn),
            name => name == iqn,
        }
    }

    /// Sends the next part of the text response (F at the last one; C
    /// and a transfer tag while more is to come).
    fn text_respond(&mut self, bhs: &Bhs) {
        let max = (self.params.send_segment as usize).max(512);
        let rest = core::mem::take(&mut self.login.text_rest);
        let (now, later) = if rest.len() > max {
            rest.split_at(max)
        } else {
            (&rest[..], &[][..])
        };
        let more = !later.is_empty();
        let mut h = pdu::header(op::TEXT_RSP, if more { 0x40 } else { 0x80 });
        pdu::put32(&mut h, 16, bhs.itt());
        pdu::put32(&mut h, 20, if more { 1 } else { pdu::NO_TAG });
        let data = now.to_vec();
        self.login.text_rest = later.to_vec();
        self.send_status(h, data);
    }
}
