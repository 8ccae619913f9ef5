//! The initiator against the appliance's own iSCSI engine, driven in
//! process over a loopback socket with a flat disk behind it, and against
//! scripted targets that break the protocol.

use super::*;
use geom::bio::{Bio, BioCmd};
use geom::page::DataCounters;
use net::iscsi::{Config, Connection};
use net::session::{copy_in, copy_out, ExportInfo, Session, Work};
use std::net::TcpListener;

const IQN: &str = "iqn.2026-12.org.strata:unit";
const DISK: usize = 1 << 20;
const T: Duration = Duration::from_secs(10);

/// What the disk was asked to do: command, offset, length, FUA.
type Log = Arc<Mutex<Vec<(BioCmd, u64, u64, bool)>>>;

fn export(name: &str) -> ExportInfo {
    ExportInfo::md(name, DISK as u64)
}

/// A target on 127.0.0.1: one engine per connection, the disk shared.
fn target(cfg: Config) -> (SocketAddr, Log) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let log: Log = Arc::default();
    let disk = Arc::new(Mutex::new(vec![0u8; DISK]));
    let lg = log.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let (disk, log) = (disk.clone(), lg.clone());
            thread::spawn(move || serve(s, cfg, &disk, &log));
        }
    });
    (addr, log)
}

fn serve(mut s: TcpStream, cfg: Config, disk: &Mutex<Vec<u8>>, log: &Log) {
    let exports = vec![export(&format!("{IQN}/0")), export(&format!("{IQN}/2"))];
    let mut c = Connection::new(cfg);
    s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    let (mut inbuf, mut outbuf) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let mut pending = Vec::new();
    let start = Instant::now();
    let mut eof = false;
    while !c.is_finished() {
        c.tick(start.elapsed().as_millis() as u64);
        if !eof {
            match s.read(&mut inbuf) {
                Ok(0) => {
                    eof = true;
                }
                Ok(n) => pending.extend_from_slice(&inbuf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
        loop {
            if !pending.is_empty() {
                let used = copy_in(&mut c, &exports, &pending);
                pending.drain(..used);
            }
            let mut worked = false;
            while let Some(w) = c.next_work() {
                worked = true;
                if let Work::Io { bio, cookie, .. } = w {
                    let bio = exec(bio, disk, log);
                    c.complete(cookie, bio, Ok(()));
                }
            }
            if !worked {
                break;
            }
        }
        if eof && pending.is_empty() {
            c.input_closed();
        }
        loop {
            let n = copy_out(&mut c, &mut outbuf);
            if n == 0 {
                break;
            }
            if s.write_all(&outbuf[..n]).is_err() {
                return;
            }
        }
        if eof && c.is_finished() {
            return;
        }
        if eof {
            thread::sleep(Duration::from_millis(5));
            if start.elapsed() > Duration::from_secs(60) {
                return;
            }
        }
    }
}

fn exec(bio: Bio, disk: &Mutex<Vec<u8>>, log: &Log) -> Bio {
    let c = DataCounters::new();
    let (o, l) = (bio.offset as usize, bio.length as usize);
    lock(log).push((bio.cmd, bio.offset, bio.length, bio.fua));
    let mut d = lock(disk);
    match bio.cmd {
        BioCmd::Read => bio.sg.copy_from_slice(0, &d[o..o + l], &c).unwrap(),
        BioCmd::Write => bio.sg.copy_to_slice(0, &mut d[o..o + l], &c).unwrap(),
        BioCmd::Discard | BioCmd::WriteZeroes => d[o..o + l].fill(0),
        _ => {}
    }
    bio
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Waits for the reply to `cookie`.
fn reply(c: &mut Initiator, cookie: u64) -> Reply {
    let until = Instant::now() + T;
    while Instant::now() < until {
        if let Some(r) = c.recv(Duration::from_millis(100)).unwrap() {
            assert_eq!(r.cookie, cookie, "replies in order here");
            return r;
        }
    }
    panic!("no reply to {cookie:#x}");
}

fn small_target() -> Config {
    Config {
        max_in_flight: 8,
        limits: net::iscsi::text::Limits {
            recv_segment: 4096,
            ..Default::default()
        },
        ..Config::default()
    }
}

/// Writes (one with FUA) that need immediate data, unsolicited Data-Out
/// and R2Ts in PDUs of the target's 4 KiB, a flush, a read in many
/// Data-In PDUs and bursts, and a write of zeroes: what was written is
/// read back, FUA and the flush reach the disk as such.
fn round_trip(settings: &Settings) {
    let (addr, log) = target(small_target());
    let mut c = Initiator::connect_with(addr, IQN, settings, T).unwrap();
    assert_eq!(c.size, DISK as u64);
    assert_eq!(c.block_size, 512);
    assert_eq!(c.negotiated.target_segment, 4096);
    let want = TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_WRITE_ZEROES;
    assert_eq!(c.flags & want, want);
    assert_eq!(c.flags & TFLAG_READ_ONLY, 0);
    let a = pattern(64 << 10, 1);
    let k = c.send(Command::Write, 0, 8192, a.len() as u32, &a).unwrap();
    assert_eq!(reply(&mut c, k).error, 0);
    let b = pattern(12 << 10, 7);
    let k = c
        .send(Command::Write, CMD_FLAG_FUA, 200 << 10, b.len() as u32, &b)
        .unwrap();
    assert_eq!(reply(&mut c, k).error, 0);
    let k = c.send(Command::Flush, 0, 0, 0, &[]).unwrap();
    assert_eq!(reply(&mut c, k).error, 0);
    let k = c.send(Command::WriteZeroes, 0, 16384, 4096, &[]).unwrap();
    assert_eq!(reply(&mut c, k).error, 0);
    let k = c.send(Command::Read, 0, 0, 256 << 10, &[]).unwrap();
    let r = reply(&mut c, k);
    assert_eq!(r.error, 0);
    let mut expect = vec![0u8; 256 << 10];
    expect[8192..8192 + a.len()].copy_from_slice(&a);
    expect[200 << 10..(200 << 10) + b.len()].copy_from_slice(&b);
    expect[16384..16384 + 4096].fill(0);
    assert!(r.data == expect, "the read returns what was written");
    let log = lock(&log).clone();
    assert!(log.iter().any(|&(cmd, off, len, fua)| cmd == BioCmd::Write
        && fua
        && off == 200 << 10
        && len == 12 << 10));
    assert!(log.iter().any(|&(cmd, ..)| cmd == BioCmd::Flush));
    assert!(log
        .iter()
        .any(|&(cmd, off, ..)| cmd == BioCmd::Write && off == 8192));
    c.disconnect();
}

#[test]
fn writes_flushes_and_reads_go_through_the_engine() {
    round_trip(&Settings::default());
}

#[test]
fn unsolicited_data_out_without_immediate_data() {
    round_trip(&Settings {
        immediate_data: false,
        first_burst: 8192,
        max_burst: 16384,
        recv_segment: 8192,
        ..Settings::default()
    });
}

#[test]
fn solicited_data_only_with_initial_r2t() {
    let s = Settings {
        initial_r2t: true,
        ..Settings::default()
    };
    round_trip(&s);
}

/// More commands than the target's window: the initiator holds them
/// until MaxCmdSN moves (a command past the window would be ignored and
/// never answered).
#[test]
fn the_cmd_sn_window_holds_commands_back() {
    let (addr, _) = target(Config {
        max_in_flight: 2,
        ..small_target()
    });
    let mut c = Initiator::connect(addr, IQN, T).unwrap();
    let mut cookies = Vec::new();
    for i in 0..24u64 {
        let d = pattern(8192, i as u8);
        cookies.push(c.send(Command::Write, 0, i * 8192, 8192, &d).unwrap());
    }
    cookies.push(c.send(Command::Read, 0, 0, 24 * 8192, &[]).unwrap());
    let mut seen = HashMap::new();
    let until = Instant::now() + T;
    while seen.len() < cookies.len() && Instant::now() < until {
        if let Some(r) = c.recv(Duration::from_millis(100)).unwrap() {
            seen.insert(r.cookie, r);
        }
    }
    assert_eq!(seen.len(), cookies.len(), "every command answered");
    assert!(seen.values().all(|r| r.error == 0));
    let data = &seen[cookies.last().unwrap()].data;
    for i in 0..24usize {
        assert!(data[i * 8192..(i + 1) * 8192] == pattern(8192, i as u8)[..]);
    }
}

/// A LUN other than 0, a target that does not exist, and a command the
/// target fails: an error code, not a lost connection.
#[test]
fn luns_unknown_targets_and_failed_commands() {
    let (addr, _) = target(small_target());
    let mut c = Initiator::connect(addr, &format!("{IQN}/2"), T).unwrap();
    assert_eq!(c.size, DISK as u64);
    let k = c.send(Command::Read, 0, DISK as u64, 4096, &[]).unwrap();
    let r = reply(&mut c, k);
    assert_eq!(r.error, EINVAL, "LBA out of range is ILLEGAL REQUEST");
    assert!(r.data.is_empty());
    let k = c.send(Command::Read, 0, 0, 512, &[]).unwrap();
    assert_eq!(reply(&mut c, k).error, 0);
    let e = Initiator::connect(addr, "iqn.2026-12.org.strata:none", T)
        .err()
        .unwrap();
    assert!(e.to_string().contains("status class 0x02"), "{e}");
    assert!(
        c.send(Command::Read, 0, 100, 512, &[]).is_err(),
        "not whole blocks"
    );
}

/// A dropped connection ends the replies with an error, as NBD's does.
#[test]
fn a_dropped_connection_is_an_error() {
    let (addr, _) = target(small_target());
    let mut c = Initiator::connect(addr, IQN, T).unwrap();
    let _ = c.sock.shutdown(Shutdown::Both);
    let until = Instant::now() + T;
    loop {
        match c.recv(Duration::from_millis(100)) {
            Err(_) => break,
            Ok(_) => assert!(Instant::now() < until, "no error after the drop"),
        }
    }
    assert!(c.recv(Duration::from_secs(2)).is_err(), "and stay an error");
}

#[test]
fn sense_data_maps_to_nbd_errors() {
    let mut fixed = [0u8; 18];
    fixed[0] = 0x70;
    fixed[2] = 0x07;
    fixed[12] = 0x27;
    fixed[13] = 0x07;
    assert_eq!(scsi_error(CHECK_CONDITION, &fixed), ENOSPC);
    fixed[13] = 0x00;
    assert_eq!(scsi_error(CHECK_CONDITION, &fixed), EPERM);
    assert_eq!(
        scsi_error(CHECK_CONDITION, &[0x72, 0x05, 0x21, 0x00]),
        EINVAL
    );
    assert_eq!(scsi_error(CHECK_CONDITION, &[0x72, 0x03, 0x11, 0x00]), EIO);
    assert_eq!(scsi_error(CHECK_CONDITION, &[]), EIO);
    assert_eq!(scsi_error(CHECK_CONDITION, &[0x70, 1]), EIO);
    assert_eq!(scsi_error(0x08, &[]), EIO, "BUSY");
    assert_eq!(parse_target("iqn.a:b/3"), ("iqn.a:b", 3));
    assert_eq!(parse_target("iqn.a:b"), ("iqn.a:b", 0));
    assert_eq!(parse_target("iqn.a:b/x"), ("iqn.a:b/x", 0));
}

/// A session state with a channel in place of the socket.
fn state() -> (State, Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel();
    let n = Negotiated {
        target_segment: 4096,
        max_burst: 8192,
        first_burst: 4096,
        initial_r2t: false,
        immediate_data: true,
    };
    let st = State {
        n,
        lun: pdu::encode_lun(0),
        cmd_sn: 10,
        max_cmd_sn: 10,
        exp_stat_sn: 5,
        next_itt: 1,
        tasks: HashMap::new(),
        waiting: VecDeque::new(),
        out: tx,
    };
    (st, rx)
}

fn target_pdu(opcode: u8, flags: u8, itt: u32, data: &[u8]) -> Pdu {
    let mut h = pdu::header(opcode, flags);
    pdu::put32(&mut h, 16, itt);
    pdu::put32(&mut h, 20, NO_TAG);
    pdu::set_data_len(&mut h, data.len());
    Pdu {
        bhs: Bhs(h),
        data: data.to_vec(),
    }
}

/// A NOP-In with a target tag is answered with a NOP-Out carrying it;
/// CmdSN and ExpStatSN follow the target.
#[test]
fn nop_in_pings_are_answered() {
    let (mut st, rx) = state();
    let mut p = target_pdu(op::NOP_IN, 0x80, NO_TAG, b"ping");
    let mut h = p.bhs.0;
    pdu::put32(&mut h, 20, 0x1234);
    pdu::put32(&mut h, 24, 9); // StatSN: the next one
    pdu::put32(&mut h, 28, 10);
    pdu::put32(&mut h, 32, 12);
    p.bhs = Bhs(h);
    assert!(st.handle(p).unwrap().is_none());
    let out = rx.try_recv().unwrap();
    let b = Bhs(out[..48].try_into().unwrap());
    assert_eq!(b.opcode(), op::NOP_OUT);
    assert!(b.immediate());
    assert_eq!(b.itt(), NO_TAG);
    assert_eq!(b.u32_at(20), 0x1234);
    assert_eq!(b.u32_at(24), 10, "CmdSN not advanced");
    assert_eq!(b.u32_at(28), 9, "ExpStatSN");
    assert_eq!(&out[48..52], b"ping");
    assert_eq!(st.max_cmd_sn, 12, "the window grew");
    // A window that would shrink, or an impossible one, is not taken.
    let mut h = target_pdu(op::NOP_IN, 0x80, NO_TAG, &[]).bhs.0;
    pdu::put32(&mut h, 28, 11);
    pdu::put32(&mut h, 32, 11);
    st.window(&Bhs(h));
    pdu::put32(&mut h, 28, 20);
    pdu::put32(&mut h, 32, 5);
    st.window(&Bhs(h));
    assert_eq!(st.max_cmd_sn, 12);
}

/// Bad Data-In fails its command; an R2T past the data, a reply for a
/// task nobody sent and an unknown opcode end the connection; none
/// panics.
#[test]
fn a_target_breaking_the_protocol_is_an_error() {
    let (mut st, rx) = state();
    let itt = st.submit(cdb16(READ_16, 0, 0, 8), 4096, Vec::new());
    let cmd = rx.try_recv().unwrap();
    assert_eq!(Bhs(cmd[..48].try_into().unwrap()).cmd_sn(), 10);
    // Data-In past the buffer, then the status: EIO.
    let mut p = target_pdu(op::DATA_IN, 0x80 | 0x01, itt, &[0u8; 512]);
    pdu::put32(&mut p.bhs.0, 40, 4000);
    let r = st.handle(p).unwrap().unwrap();
    assert_eq!((r.cookie, r.error), (u64::from(itt), EIO));
    // The window opens by one: a short read, GOOD but not all the data.
    let open = |st: &mut State, max: u32| {
        let mut h = target_pdu(op::NOP_IN, 0x80, NO_TAG, &[]).bhs.0;
        pdu::put32(&mut h, 28, 11);
        pdu::put32(&mut h, 32, max);
        st.handle(Pdu {
            bhs: Bhs(h),
            data: Vec::new(),
        })
        .unwrap();
    };
    open(&mut st, 11);
    let itt = st.submit(cdb16(READ_16, 0, 0, 8), 4096, Vec::new());
    let b = Bhs(rx.try_recv().unwrap()[..48].try_into().unwrap());
    assert_eq!((b.itt(), b.cmd_sn()), (itt, 11));
    let p = target_pdu(op::DATA_IN, 0x80 | 0x01, itt, &[0u8; 512]);
    assert_eq!(st.handle(p).unwrap().unwrap().error, EIO);
    // Window closed (MaxCmdSN 11, CmdSN 12 next): queued, not sent; a
    // target answering it is wrong.
    let w = st.submit(cdb16(WRITE_16, 0, 0, 16), 0, vec![1; 8192]);
    assert!(rx.try_recv().is_err(), "held until the window opens");
    assert!(st.handle(target_pdu(op::SCSI_RSP, 0x80, w, &[])).is_err());
    open(&mut st, 12);
    let cmd = rx.try_recv().unwrap();
    let b = Bhs(cmd[..48].try_into().unwrap());
    assert_eq!(
        (b.opcode(), b.cmd_sn(), b.data_len()),
        (op::SCSI_CMD, 12, 4096)
    );
    assert!(b.final_bit(), "FirstBurstLength is all immediate");
    // An R2T beyond the data.
    let mut p = target_pdu(op::R2T, 0x80, w, &[]);
    pdu::put32(&mut p.bhs.0, 20, 7);
    pdu::put32(&mut p.bhs.0, 40, 4096);
    pdu::put32(&mut p.bhs.0, 44, 8192);
    assert!(st.handle(p.clone()).is_err());
    // A proper one: two Data-Out PDUs of the target's 4 KiB.
    pdu::put32(&mut p.bhs.0, 44, 4096);
    pdu::put32(&mut p.bhs.0, 40, 0);
    st.handle(p).unwrap();
    let d = rx.try_recv().unwrap();
    let b = Bhs(d[..48].try_into().unwrap());
    assert_eq!(
        (b.opcode(), b.u32_at(20), b.data_len()),
        (op::DATA_OUT, 7, 4096)
    );
    assert!(b.final_bit());
    assert!(st
        .handle(target_pdu(op::SCSI_RSP, 0x80, 0x999, &[]))
        .is_err());
    assert!(st.handle(target_pdu(0x3e, 0x80, 0, &[])).is_err());
    assert!(st
        .handle(target_pdu(op::REJECT, 0x80, NO_TAG, &[1, 2]))
        .is_err());
    // A Reject of the command fails it.
    let mut rej = pdu::header(op::SCSI_CMD, 0x80);
    pdu::put32(&mut rej, 16, w);
    let r = st
        .handle(target_pdu(op::REJECT, 0x80, NO_TAG, &rej))
        .unwrap()
        .unwrap();
    assert_eq!((r.cookie, r.error), (u64::from(w), EIO));
}

/// Scripted targets: garbage instead of a Login Response, a data length
/// past what the initiator declared, a target that wants CHAP, one that
/// closes: each is an error.
#[test]
fn bad_logins_are_errors() {
    let script = |answer: Vec<u8>| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut h = [0u8; 48];
            let _ = s.read_exact(&mut h);
            let n = Bhs(h).data_len();
            let mut d = vec![0u8; n + pdu::pad(n)];
            let _ = s.read_exact(&mut d);
            let _ = s.write_all(&answer);
            thread::sleep(Duration::from_millis(300));
        });
        Initiator::connect(addr, IQN, Duration::from_secs(2))
            .err()
            .unwrap()
            .to_string()
    };
    let e = script(pdu::header(op::DATA_IN, 0x80).to_vec());
    assert!(e.contains("opcode 0x25"), "{e}");
    let mut h = pdu::header(op::LOGIN_RSP, 0x81);
    pdu::set_data_len(&mut h, 0xff_ffff);
    assert!(script(h.to_vec()).contains("more than"));
    let mut want_chap = Vec::new();
    text::push(&mut want_chap, "AuthMethod", "CHAP");
    let h = pdu::header(op::LOGIN_RSP, 0x81);
    assert!(script(pdu_bytes(h, &want_chap)).contains("AuthMethod=CHAP"));
    assert!(script(pdu_bytes(h, b"junk")).contains("malformed"));
    let e = script(Vec::new());
    assert!(!e.is_empty());
}
