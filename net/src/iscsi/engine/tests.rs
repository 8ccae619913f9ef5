//! Engine tests over byte transcripts: a small initiator builds PDUs, a
//! flat array plays the disk, and every answer is decoded and checked.

use super::{Config, Connection};
use crate::iscsi::pdu::{self, op, Bhs, BHS_LEN, NO_TAG};
use crate::session::{copy_in, copy_out, ExportInfo, Session, Work};
use alloc::string::String;
use alloc::vec::Vec;
use crypt::crc32c::crc32c;
use geom::bio::{Bio, BioCmd};
use geom::page::DataCounters;

const IQN: &str = "iqn.2026-12.org.strata:t1";
const DISK: usize = 1 << 20;

fn export(name: &str) -> ExportInfo {
    ExportInfo::md(name, DISK as u64)
}

/// A received PDU.
#[derive(Debug)]
struct Pdu {
    bhs: Bhs,
    data: Vec<u8>,
}

/// One initiator against one connection, with the disk behind it.
struct Rig {
    c: Connection,
    exports: Vec<ExportInfo>,
    disk: Vec<u8>,
    cmd_sn: u32,
    itt: u32,
    rx: Vec<u8>,
    hd: bool,
    dd: bool,
    /// Cookies of the saves asked for, not yet answered.
    saves: Vec<u64>,
    /// Bios are kept in `held` instead of run at once.
    hold: bool,
    held: Vec<(Bio, u64)>,
}

impl Rig {
    fn new() -> Rig {
        let name = alloc::format!("{IQN}/0");
        Rig {
            c: Connection::new(Config {
                max_in_flight: 8,
                ..Config::default()
            }),
            exports: alloc::vec![export(&name), export("iqn.2026-12.org.strata:t2/3")],
            disk: alloc::vec![0; DISK],
            cmd_sn: 1,
            itt: 1,
            rx: Vec::new(),
            hd: false,
            dd: false,
            saves: Vec::new(),
            hold: false,
            held: Vec::new(),
        }
    }

    /// Runs the bios kept back, and what they lead to.
    fn release(&mut self) {
        let held = core::mem::take(&mut self.held);
        for (bio, cookie) in held {
            let bio = self.exec(bio);
            self.c.complete(cookie, bio, Ok(()));
        }
        self.run();
    }

    /// Sends one PDU (digests as negotiated).
    fn send(&mut self, mut h: [u8; BHS_LEN], data: &[u8]) {
        pdu::set_data_len(&mut h, data.len());
        let mut v = h.to_vec();
        if self.hd {
            v.extend_from_slice(&crc32c(&h).to_le_bytes());
        }
        if !data.is_empty() {
            let mut d = data.to_vec();
            d.resize(data.len() + pdu::pad(data.len()), 0);
            v.extend_from_slice(&d);
            if self.dd {
                v.extend_from_slice(&crc32c(&d).to_le_bytes());
            }
        }
        let used = copy_in(&mut self.c, &self.exports, &v);
        assert_eq!(used, v.len(), "the engine took every byte");
        self.run();
    }

    /// Runs the bios the connection asks for on the flat disk.
    fn run(&mut self) {
        while let Some(w) = self.c.next_work() {
            match w {
                Work::Io { bio, cookie, .. } if self.hold => self.held.push((bio, cookie)),
                Work::Io { bio, cookie, .. } => {
                    let bio = self.exec(bio);
                    self.c.complete(cookie, bio, Ok(()));
                }
                Work::Save { export, cookie, .. } => {
                    assert!(self.exports[export].keeps_state);
                    self.saves.push(cookie);
                }
                Work::Control(_) => panic!("no control work"),
            }
        }
    }

    fn exec(&mut self, bio: Bio) -> Bio {
        let c = DataCounters::new();
        let (o, l) = (bio.offset as usize, bio.length as usize);
        match bio.cmd {
            BioCmd::Read => bio.sg.copy_from_slice(0, &self.disk[o..o + l], &c).unwrap(),
            BioCmd::Write => bio
                .sg
                .copy_to_slice(0, &mut self.disk[o..o + l], &c)
                .unwrap(),
            BioCmd::Discard | BioCmd::WriteZeroes => self.disk[o..o + l].fill(0),
            _ => {}
        }
        bio
    }

    /// Every complete PDU the target sent.
    fn recv(&mut self) -> Vec<Pdu> {
        let mut buf = [0u8; 4096];
        loop {
            let n = copy_out(&mut self.c, &mut buf);
            if n == 0 {
                break;
            }
            self.rx.extend_from_slice(&buf[..n]);
        }
        let mut out = Vec::new();
        loop {
            let hl = BHS_LEN + if self.hd { 4 } else { 0 };
            if self.rx.len() < hl {
                break;
            }
            let mut b = [0u8; BHS_LEN];
            b.copy_from_slice(&self.rx[..BHS_LEN]);
            let bhs = Bhs(b);
            if self.hd {
                let d = u32::from_le_bytes(self.rx[BHS_LEN..BHS_LEN + 4].try_into().unwrap());
                assert_eq!(d, crc32c(&b), "header digest");
            }
            let dl = bhs.data_len();
            let padded = dl + pdu::pad(dl);
            let total = hl + padded + if self.dd && dl > 0 { 4 } else { 0 };
            if self.rx.len() < total {
                break;
            }
            let data = self.rx[hl..hl + dl].to_vec();
            if self.dd && dl > 0 {
                let d =
                    u32::from_le_bytes(self.rx[hl + padded..hl + padded + 4].try_into().unwrap());
                assert_eq!(d, crc32c(&self.rx[hl..hl + padded]), "data digest");
            }
            self.rx.drain(..total);
            out.push(Pdu { bhs, data });
        }
        out
    }

    /// A login request in one PDU.
    fn login_pdu(&mut self, csg: u8, nsg: u8, transit: bool, keys: &[(&str, &str)]) -> Vec<Pdu> {
        let mut h = pdu::header(
            op::LOGIN_REQ | 0x40,
            if transit { 0x80 } else { 0 } | (csg << 2) | nsg,
        );
        h[8..14].copy_from_slice(&[0x80, 0, 0, 0x12, 0x34, 0x56]);
        pdu::put32(&mut h, 16, 0x100);
        pdu::put32(&mut h, 24, self.cmd_sn);
        let mut d = Vec::new();
        for (k, v) in keys {
            crate::iscsi::text::push(&mut d, k, v);
        }
        self.send(h, &d);
        self.recv()
    }

    /// A whole login to `target` with the given operational keys.
    fn login(&mut self, target: &str, op_keys: &[(&str, &str)]) -> Vec<(String, String)> {
        let r = self.login_pdu(
            0,
            1,
            true,
            &[
                ("InitiatorName", "iqn.2026-12.org.strata:test"),
                ("SessionType", "Normal"),
                ("TargetName", target),
                ("AuthMethod", "None"),
            ],
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].bhs.u16_at(36), 0, "security stage accepted");
        let r = self.login_pdu(1, 3, true, op_keys);
        assert_eq!(r.len(), 1);
        let b = &r[0].bhs;
        assert_eq!(b.opcode(), op::LOGIN_RSP);
        assert_eq!(b.u16_at(36), 0, "login accepted");
        assert_eq!(b.flags() & 0x83, 0x83, "transit to full feature");
        assert_ne!(b.u16_at(14), 0, "a TSIH");
        crate::iscsi::text::parse(&r[0].data).unwrap()
    }

    /// A SCSI command; `imm`: immediate data.
    fn command(&mut self, cdb: &[u8], read: u32, write: u32, imm: &[u8], fin: bool) -> u32 {
        let itt = self.itt;
        self.itt += 1;
        let mut flags = if fin { 0x80 } else { 0 };
        if read > 0 {
            flags |= 0x40;
        }
        if write > 0 {
            flags |= 0x20;
        }
        let mut h = pdu::header(op::SCSI_CMD, flags);
        pdu::put32(&mut h, 16, itt);
        pdu::put32(&mut h, 20, read.max(write));
        pdu::put32(&mut h, 24, self.cmd_sn);
        self.cmd_sn += 1;
        h[32..32 + cdb.len()].copy_from_slice(cdb);
        self.send(h, imm);
        itt
    }

    fn data_out(&mut self, itt: u32, ttt: u32, data_sn: u32, offset: u32, data: &[u8], fin: bool) {
        let mut h = pdu::header(op::DATA_OUT, if fin { 0x80 } else { 0 });
        pdu::put32(&mut h, 16, itt);
        pdu::put32(&mut h, 20, ttt);
        pdu::put32(&mut h, 36, data_sn);
        pdu::put32(&mut h, 40, offset);
        self.send(h, data);
    }
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = write10(lba, blocks);
    c[0] = 0x28;
    c
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

#[test]
fn a_login_negotiates_and_reaches_full_feature() {
    let mut r = Rig::new();
    let keys = r.login(
        IQN,
        &[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "65536"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("X-com.example.Private", "1"),
        ],
    );
    let get = |k: &str| keys.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
    assert_eq!(get("HeaderDigest"), Some("None"));
    assert_eq!(get("InitialR2T"), Some("Yes"));
    assert_eq!(get("X-com.example.Private"), Some("NotUnderstood"));
    assert!(
        get("MaxRecvDataSegmentLength").is_some(),
        "the target declares its own"
    );
}

#[test]
fn a_login_to_an_unknown_target_is_refused() {
    let mut r = Rig::new();
    let p = r.login_pdu(
        0,
        1,
        true,
        &[
            ("InitiatorName", "iqn.2026-12.org.strata:test"),
            ("TargetName", "iqn.2026-12.org.strata:nope"),
        ],
    );
    assert_eq!(p[0].bhs.u16_at(36), 0x0203);
    assert!(!r.c.wants_recv(), "nothing more is read after a refusal");
    assert_eq!(copy_in(&mut r.c, &r.exports, &[0u8; 48]), 0);
    assert!(r.c.is_finished());
}

#[test]
fn a_login_without_initiator_name_is_refused() {
    let mut r = Rig::new();
    let p = r.login_pdu(0, 1, true, &[("TargetName", IQN)]);
    assert_eq!(p[0].bhs.u16_at(36), 0x0207);
}

#[test]
fn discovery_lists_every_target_with_its_portal() {
    let mut r = Rig::new();
    r.c = Connection::new(Config {
        portal: Some(([127, 0, 0, 1], 3260)),
        ..Config::default()
    });
    let p = r.login_pdu(
        0,
        3,
        true,
        &[
            ("InitiatorName", "iqn.2026-12.org.strata:test"),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ],
    );
    assert_eq!(p[0].bhs.u16_at(36), 0);
    let mut h = pdu::header(op::TEXT_REQ | 0x40, 0x80);
    pdu::put32(&mut h, 16, 9);
    pdu::put32(&mut h, 20, NO_TAG);
    pdu::put32(&mut h, 24, r.cmd_sn);
    r.send(h, b"SendTargets=All\0");
    let p = r.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].bhs.opcode(), op::TEXT_RSP);
    let keys = crate::iscsi::text::parse(&p[0].data);
    // Two targets: keys repeat, which the strict parser refuses; check the text.
    assert!(keys.is_err());
    let s = String::from_utf8(p[0].data.clone()).unwrap();
    assert_eq!(
        s,
        "TargetName=iqn.2026-12.org.strata:t1\0TargetAddress=127.0.0.1:3260,1\0\
         TargetName=iqn.2026-12.org.strata:t2\0TargetAddress=127.0.0.1:3260,1\0"
    );
}

#[test]
fn a_write_with_immediate_data_and_r2ts_reads_back() {
    let mut r = Rig::new();
    r.login(
        IQN,
        &[
            ("MaxBurstLength", "16384"),
            ("FirstBurstLength", "8192"),
            ("InitialR2T", "Yes"),
            ("MaxRecvDataSegmentLength", "8192"),
        ],
    );
    let data = pattern(64 * 512, 3);
    // 8 KiB immediate, the rest by R2T in 16 KiB bursts.
    let itt = r.command(&write10(8, 64), 0, data.len() as u32, &data[..8192], true);
    let mut sent = 8192usize;
    let mut guard = 0;
    loop {
        let p = r.recv();
        let mut r2ts = Vec::new();
        let mut status = None;
        for x in p {
            match x.bhs.opcode() {
                op::R2T => r2ts.push((x.bhs.u32_at(20), x.bhs.u32_at(40), x.bhs.u32_at(44))),
                op::SCSI_RSP => status = Some(x.bhs.0[3]),
                o => panic!("unexpected opcode {o:#x}"),
            }
        }
        if let Some(s) = status {
            assert_eq!(s, 0, "GOOD");
            break;
        }
        assert!(!r2ts.is_empty(), "R2Ts for the rest");
        for (ttt, off, len) in r2ts {
            assert_eq!(off as usize, sent, "R2Ts in order");
            let mut sn = 0;
            let mut o = off as usize;
            while o < (off + len) as usize {
                let n = 4096.min((off + len) as usize - o);
                r.data_out(
                    itt,
                    ttt,
                    sn,
                    o as u32,
                    &data[o..o + n],
                    o + n == (off + len) as usize,
                );
                o += n;
                sn += 1;
            }
            sent += len as usize;
        }
        guard += 1;
        assert!(guard < 10);
    }
    assert_eq!(&r.disk[8 * 512..8 * 512 + data.len()], &data[..]);
    // Read it back: Data-In PDUs of at most 8 KiB, status in the last.
    let itt = r.command(&read10(8, 64), data.len() as u32, 0, &[], true);
    let p = r.recv();
    let mut got = Vec::new();
    for (i, x) in p.iter().enumerate() {
        assert_eq!(x.bhs.opcode(), op::DATA_IN);
        assert_eq!(x.bhs.itt(), itt);
        assert_eq!(x.bhs.u32_at(36), i as u32, "DataSN");
        assert_eq!(x.bhs.u32_at(40) as usize, got.len(), "buffer offset");
        assert!(x.data.len() <= 8192);
        got.extend_from_slice(&x.data);
    }
    let last = &p.last().unwrap().bhs;
    assert_eq!(last.flags() & 0x81, 0x81, "F and S in the last Data-In");
    assert_eq!(last.0[3], 0);
    assert_eq!(got, data);
}

#[test]
fn unsolicited_data_out_is_taken_when_initial_r2t_is_no() {
    let mut r = Rig::new();
    r.login(
        IQN,
        &[
            ("InitialR2T", "No"),
            ("FirstBurstLength", "16384"),
            ("MaxBurstLength", "65536"),
        ],
    );
    let data = pattern(64 * 512, 9);
    let itt = r.command(&write10(0, 64), 0, data.len() as u32, &data[..4096], false);
    r.data_out(itt, NO_TAG, 0, 4096, &data[4096..8192], false);
    r.data_out(itt, NO_TAG, 1, 8192, &data[8192..16384], true);
    let p = r.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].bhs.opcode(), op::R2T);
    assert_eq!(p[0].bhs.u32_at(40), 16384);
    assert_eq!(p[0].bhs.u32_at(44), 16384);
    let ttt = p[0].bhs.u32_at(20);
    r.data_out(itt, ttt, 0, 16384, &data[16384..], true);
    let p = r.recv();
    assert_eq!(p[0].bhs.opcode(), op::SCSI_RSP);
    assert_eq!(p[0].bhs.0[3], 0);
    assert_eq!(&r.disk[..data.len()], &data[..]);
}

#[test]
fn digests_are_checked_and_sent() {
    let mut r = Rig::new();
    let keys = r.login(
        IQN,
        &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C,None")],
    );
    assert!(keys.contains(&(String::from("HeaderDigest"), String::from("CRC32C"))));
    r.hd = true;
    r.dd = true;
    let data = pattern(1000, 1);
    let itt = r.command(&write10(1, 2), 0, 1024, &pattern(1024, 1), true);
    let p = r.recv();
    assert_eq!(p[0].bhs.opcode(), op::SCSI_RSP, "{itt}");
    assert_eq!(p[0].bhs.0[3], 0);
    // A ping with 1000 bytes comes back with digests (checked in recv).
    let mut h = pdu::header(op::NOP_OUT | 0x40, 0x80);
    pdu::put32(&mut h, 16, 77);
    pdu::put32(&mut h, 20, NO_TAG);
    pdu::put32(&mut h, 24, r.cmd_sn);
    r.send(h, &data);
    let p = r.recv();
    assert_eq!(p[0].bhs.opcode(), op::NOP_IN);
    assert_eq!(p[0].data, data);
    // A bad header digest ends the connection.
    let mut h = pdu::header(op::NOP_OUT | 0x40, 0x80);
    pdu::put32(&mut h, 16, 78);
    let mut v = h.to_vec();
    v.extend_from_slice(&(crc32c(&h) ^ 1).to_le_bytes());
    copy_in(&mut r.c, &r.exports, &v);
    assert!(r.recv().is_empty());
    assert!(r.c.is_finished());
}

#[test]
fn commands_outside_the_cmd_sn_window_are_ignored() {
    let mut r = Rig::new();
    r.login(IQN, &[]);
    r.cmd_sn += 1000;
    r.command(&[0, 0, 0, 0, 0, 0], 0, 0, &[], true);
    assert!(r.recv().is_empty(), "no answer to a CmdSN beyond MaxCmdSN");
    r.cmd_sn -= 1001;
    let itt = r.command(&[0, 0, 0, 0, 0, 0], 0, 0, &[], true);
    let p = r.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].bhs.itt(), itt);
    assert_eq!(p[0].bhs.opcode(), op::SCSI_RSP);
}

#[test]
fn a_short_expected_length_is_an_overflow_residual() {
    let mut r = Rig::new();
    r.login(IQN, &[]);
    // INQUIRY asking for 96 bytes with EDTL 36.
    let _ = r.command(&[0x12, 0, 0, 0, 96, 0], 36, 0, &[], true);
    let p = r.recv();
    let last = &p.last().unwrap().bhs;
    let got: usize = p.iter().map(|x| x.data.len()).sum();
    assert_eq!(got, 36);
    assert_eq!(last.flags() & 0x04, 0x04, "O bit");
    assert!(last.u32_at(44) > 0);
}

#[test]
fn logout_answers_then_ends_the_connection() {
    let mut r = Rig::new();
    r.login(IQN, &[]);
    let mut h = pdu::header(op::LOGOUT_REQ | 0x40, 0x80);
    pdu::put32(&mut h, 16, 5);
    pdu::put32(&mut h, 24, r.cmd_sn);
    r.send(h, &[]);
    let p = r.recv();
    assert_eq!(p[0].bhs.opcode(), op::LOGOUT_RSP);
    assert_eq!(p[0].bhs.0[2], 0);
    assert!(r.c.is_finished());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Random PDUs after a login: nothing panics, every answer decodes.
    #[test]
    fn random_pdus_do_not_panic(
        pdus in proptest::collection::vec(
            (0u8..0x40, proptest::prelude::any::<u8>(), proptest::collection::vec(proptest::prelude::any::<u8>(), 46), 0usize..600),
            1..12,
        )
    ) {
        let mut r = Rig::new();
        r.login(IQN, &[]);
        for (opcode, flags, rest, dlen) in pdus {
            let mut h = [0u8; BHS_LEN];
            h[0] = opcode;
            h[1] = flags;
            h[2..].copy_from_slice(&rest);
            h[4] %= 3;
            pdu::set_data_len(&mut h, dlen);
            let mut v = h.to_vec();
            v.extend_from_slice(&alloc::vec![0x5a; usize::from(h[4]) * 4 + dlen + pdu::pad(dlen)]);
            copy_in(&mut r.c, &r.exports, &v);
            r.run();
            let _ = r.recv();
            if r.c.is_finished() {
                break;
            }
        }
    }
}

/// A target with CHAP (and mutual CHAP) and a seeded generator.
fn chap_rig(mutual: bool) -> Rig {
    let mut r = Rig::new();
    r.c = Connection::new(Config {
        seed: Some([7; 32]),
        ..Config::default()
    });
    r.exports[0].access.chap = Some((String::from("alice"), String::from("secretsecret12")));
    if mutual {
        r.exports[0].access.mutual = Some((String::from("target"), String::from("targetsecret99")));
    }
    r
}

fn md5(id: u8, secret: &str, challenge: &[u8]) -> Vec<u8> {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret.as_bytes());
    h.update(challenge);
    h.finalize().to_vec()
}

fn hexs(b: &[u8]) -> String {
    let mut s = String::from("0x");
    for x in b {
        s.push_str(&alloc::format!("{x:02x}"));
    }
    s
}

fn unhex(s: &str) -> Vec<u8> {
    let h = s.strip_prefix("0x").unwrap();
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

/// CHAP up to the initiator's answer; the target's last response.
fn chap_login(r: &mut Rig, user: &str, secret: &str, mutual: Option<&[u8]>) -> Pdu {
    let p = r.login_pdu(
        0,
        1,
        true,
        &[
            ("InitiatorName", "iqn.2026-12.org.strata:test"),
            ("TargetName", IQN),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ],
    );
    assert_eq!(p[0].bhs.u16_at(36), 0);
    assert_eq!(p[0].bhs.flags() & 0x80, 0, "held in the security stage");
    let keys = crate::iscsi::text::parse(&p[0].data).unwrap();
    assert!(keys.contains(&(String::from("AuthMethod"), String::from("CHAP"))));
    let p = r.login_pdu(0, 1, false, &[("CHAP_A", "7,5")]);
    let keys = crate::iscsi::text::parse(&p[0].data).unwrap();
    let get = |k: &str| {
        keys.iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(get("CHAP_A"), "5");
    let id: u8 = get("CHAP_I").parse().unwrap();
    let c = unhex(&get("CHAP_C"));
    assert!(c.len() >= 16);
    let resp = hexs(&md5(id, secret, &c));
    let mut keys = alloc::vec![("CHAP_N", String::from(user)), ("CHAP_R", resp)];
    if let Some(mc) = mutual {
        keys.push(("CHAP_I", String::from("9")));
        keys.push(("CHAP_C", hexs(mc)));
    }
    let k: Vec<(&str, &str)> = keys.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let mut p = r.login_pdu(0, 1, true, &k);
    p.remove(0)
}

#[test]
fn chap_with_the_right_secret_logs_in() {
    let mut r = chap_rig(false);
    let p = chap_login(&mut r, "alice", "secretsecret12", None);
    assert_eq!(p.bhs.u16_at(36), 0);
    assert_eq!(p.bhs.flags() & 0x80, 0x80, "on to the operational stage");
}

#[test]
fn chap_with_a_wrong_secret_or_user_is_refused() {
    let mut r = chap_rig(false);
    let p = chap_login(&mut r, "alice", "wrongwrongwrong", None);
    assert_eq!(p.bhs.u16_at(36), 0x0201);
    let mut r = chap_rig(false);
    let p = chap_login(&mut r, "mallory", "secretsecret12", None);
    assert_eq!(p.bhs.u16_at(36), 0x0201);
}

#[test]
fn chap_cannot_be_skipped() {
    let mut r = chap_rig(false);
    let p = r.login_pdu(
        1,
        3,
        true,
        &[
            ("InitiatorName", "iqn.2026-12.org.strata:test"),
            ("TargetName", IQN),
        ],
    );
    assert_eq!(
        p[0].bhs.u16_at(36),
        0x0201,
        "the operational stage first is refused"
    );
    let mut r = chap_rig(false);
    let p = r.login_pdu(
        0,
        1,
        true,
        &[
            ("InitiatorName", "iqn.2026-12.org.strata:test"),
            ("TargetName", IQN),
            ("AuthMethod", "None"),
        ],
    );
    assert_eq!(p[0].bhs.u16_at(36), 0x0201, "AuthMethod=None is refused");
}

#[test]
fn mutual_chap_answers_the_initiators_challenge() {
    let mut r = chap_rig(true);
    let mc = [0x42u8; 16];
    let p = chap_login(&mut r, "alice", "secretsecret12", Some(&mc));
    assert_eq!(p.bhs.u16_at(36), 0);
    let keys = crate::iscsi::text::parse(&p.data).unwrap();
    let get = |k: &str| {
        keys.iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(get("CHAP_N"), "target");
    assert_eq!(unhex(&get("CHAP_R")), md5(9, "targetsecret99", &mc));
    // Without mutual credentials the target cannot answer: refused.
    let mut r = chap_rig(false);
    let p = chap_login(&mut r, "alice", "secretsecret12", Some(&mc));
    assert_eq!(p.bhs.u16_at(36), 0x0201);
}

#[test]
fn chap_without_entropy_is_refused() {
    let mut r = chap_rig(false);
    r.c = Connection::new(Config::default());
    let p = r.login_pdu(
        0,
        1,
        true,
        &[
            ("InitiatorName", "iqn.2026-12.org.strata:test"),
            ("TargetName", IQN),
            ("AuthMethod", "CHAP"),
        ],
    );
    assert_eq!(p[0].bhs.u16_at(36), 0);
    let p = r.login_pdu(0, 1, false, &[("CHAP_A", "5")]);
    assert_eq!(p[0].bhs.u16_at(36), 0x0300);
}

#[test]
fn a_stopping_target_answers_new_commands_busy() {
    let mut r = Rig::new();
    r.login(IQN, &[]);
    r.c.begin_shutdown();
    let data = pattern(512, 1);
    let itt = r.command(&write10(0, 1), 0, 512, &data, true);
    let p = r.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].bhs.itt(), itt);
    assert_eq!(p[0].bhs.0[3], 0x08, "BUSY");
    assert!(r.disk[..512].iter().all(|&b| b == 0), "nothing written");
    assert_eq!(r.c.requests_open(), 0, "the refused command holds nothing");
}

#[test]
fn the_reserved_task_tag_is_rejected() {
    let mut r = Rig::new();
    r.login(IQN, &[]);
    let mut h = pdu::header(op::SCSI_CMD, 0x80);
    pdu::put32(&mut h, 16, NO_TAG);
    pdu::put32(&mut h, 24, r.cmd_sn);
    h[32] = 0; // TEST UNIT READY
    r.send(h, &[]);
    let p = r.recv();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].bhs.opcode(), op::REJECT);
    assert_eq!(p[0].bhs.0[2], pdu::reject::INVALID_FIELD);
    assert_eq!(r.c.requests_open(), 0);
}

#[test]
fn persistent_reserve_out_answers_once_its_state_is_saved() {
    let mut r = Rig::new();
    let target = "iqn.2026-12.org.strata:saves";
    r.exports[0].name = alloc::format!("{target}/0");
    r.exports[0].keeps_state = true;
    r.login(target, &[]);
    let register = |key: u8, aptpl: bool| {
        let mut p = alloc::vec![0u8; 24];
        p[15] = key;
        p[20] = u8::from(aptpl);
        p
    };
    let prout = [0x5f, 6, 0, 0, 0, 0, 0, 0, 24, 0];
    r.command(&prout, 0, 24, &register(1, true), true);
    assert!(
        r.recv().iter().all(|p| p.bhs.opcode() != op::SCSI_RSP),
        "no status before the state is kept"
    );
    assert_eq!(r.saves.len(), 1, "one save asked for");
    assert_eq!(r.c.in_flight(), 1, "the save counts as in flight");
    let cookie = r.saves.remove(0);
    r.c.saved(cookie, Ok(()));
    let p = r.recv();
    let rsp = p
        .iter()
        .find(|p| p.bhs.opcode() == op::SCSI_RSP)
        .expect("a response");
    assert_eq!(rsp.bhs.0[3], 0, "GOOD");
    // A save that fails: CHECK CONDITION, HARDWARE ERROR.
    r.command(&prout, 0, 24, &register(2, true), true);
    let cookie = r.saves.remove(0);
    r.c.saved(cookie, Err(geom::bio::BioError::Io));
    let p = r.recv();
    let rsp = p
        .iter()
        .find(|p| p.bhs.opcode() == op::SCSI_RSP)
        .expect("a response");
    assert_eq!(rsp.bhs.0[3], 2, "CHECK CONDITION");
    let sense = &rsp.data[2..];
    assert_eq!((sense[2] & 0x0f, sense[12], sense[13]), (4, 0x44, 0));
    assert_eq!(r.c.in_flight(), 0);
}

/// Two connections to one LU (their own disks: only the bios' order
/// matters), logged in to a target of its own.
fn two_rigs(target: &str) -> (Rig, Rig) {
    let rig = || {
        let mut r = Rig::new();
        r.exports[0].name = alloc::format!("{target}/0");
        r.login(target, &[]);
        r.hold = true;
        r
    };
    (rig(), rig())
}

fn caw(lba: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&u64::from(lba).to_be_bytes());
    c[13] = 1;
    c
}

fn status_of(p: &[Pdu]) -> Option<u8> {
    p.iter()
        .find(|p| {
            p.bhs.opcode() == op::SCSI_RSP
                || (p.bhs.opcode() == op::DATA_IN && p.bhs.flags() & 1 != 0)
        })
        .map(|p| p.bhs.0[3])
}

#[test]
fn no_write_lands_inside_a_compare_and_write() {
    let (mut a, mut b) = two_rigs("iqn.2026-12.org.strata:atomic1");
    // A's COMPARE AND WRITE reads block 0 (held back).
    let mut data = alloc::vec![0u8; 1024];
    data[512..].fill(0x5a);
    a.command(&caw(0), 0, 1024, &data, true);
    assert_eq!(a.held.len(), 1, "the compare's read is out");
    // B's write to block 0 waits; its write elsewhere goes.
    b.command(&write10(0, 1), 0, 512, &[7; 512], true);
    assert!(b.held.is_empty(), "a write inside the range waits");
    b.command(&write10(100, 1), 0, 512, &[7; 512], true);
    assert_eq!(b.held.len(), 1, "a write beside it goes");
    b.release();
    // The read comes back: A's write goes, then A answers GOOD.
    a.release();
    a.release();
    assert_eq!(status_of(&a.recv()), Some(0), "GOOD");
    assert_eq!(a.disk[..512], [0x5a; 512]);
    // B's waiting write is sent once the range is free.
    b.c.tick(1);
    b.run();
    assert_eq!(b.held.len(), 1, "the waiting write goes");
    assert_eq!(b.held[0].0.offset, 0);
    b.release();
}

#[test]
fn a_compare_and_write_waits_for_writes_in_flight() {
    let (mut a, mut b) = two_rigs("iqn.2026-12.org.strata:atomic2");
    b.command(&write10(8, 1), 0, 512, &[7; 512], true);
    assert_eq!(b.held.len(), 1);
    let mut data = alloc::vec![0u8; 1024];
    data[512..].fill(0x33);
    a.command(&caw(8), 0, 1024, &data, true);
    assert!(
        a.held.is_empty(),
        "the compare waits for the write in flight"
    );
    b.release();
    a.c.tick(1);
    a.run();
    assert_eq!(a.held.len(), 1, "then it reads");
    a.release();
    a.release();
    assert_eq!(status_of(&a.recv()), Some(0));
    // A connection that goes away gives back what it held.
    a.command(&caw(9), 0, 1024, &data, true);
    assert_eq!(a.held.len(), 1);
    drop(a);
    b.command(&write10(9, 1), 0, 512, &[1; 512], true);
    assert_eq!(b.held.len(), 1, "nothing held by a closed connection");
}
