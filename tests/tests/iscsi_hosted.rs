//! iSCSI scenarios against hosted Strata (the same stack as a process),
//! through real clients (libiscsi's utilities, QEMU's iscsi driver,
//! `iscsi-test-cu`). The same scenarios run against tgt in `iscsi_tgt.rs`.
//!
//! The conformance run alone:
//! `cargo test --release -p strata-tests --test iscsi_hosted conformance -- --include-ignored --nocapture`

use strata_tests::iscsi_clients::{self as iscsi, Peer::Strata};
use strata_tests::Platform::Hosted;

#[test]
fn discovery() {
    iscsi::discovery(Strata(Hosted));
}

#[test]
fn inquiry_pages() {
    iscsi::inquiry_pages(Strata(Hosted));
}

#[test]
fn read_capacity() {
    iscsi::read_capacity(Strata(Hosted));
}

#[test]
fn qemu_img_roundtrip() {
    iscsi::qemu_img_roundtrip(Strata(Hosted));
}

#[test]
fn read_only() {
    iscsi::read_only(Strata(Hosted));
}

#[test]
fn chap() {
    iscsi::chap(Strata(Hosted));
}

#[test]
fn mutual_chap() {
    iscsi::mutual_chap(Strata(Hosted));
}

#[test]
fn initiator_list() {
    iscsi::initiator_list(Strata(Hosted));
}

#[test]
fn nbd_and_iscsi_same_provider() {
    iscsi::nbd_and_iscsi(Hosted);
}

/// libiscsi's whole suite (`iscsi-test-cu -d -S -t ALL`) against tgt and
/// then Strata, both counts printed; Strata must fail none.
#[test]
fn conformance() {
    iscsi::conformance(Hosted);
}

/// A raw initiator connection for malformed traffic: every read and write
/// has a time limit, so a target that stops answering fails the test.
struct Raw(std::net::TcpStream);

/// How long a raw connection waits for the target.
const RAW_SECS: u64 = 10;

impl Raw {
    fn connect(port: u16) -> Raw {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let t = std::time::Duration::from_secs(RAW_SECS);
        let s = std::net::TcpStream::connect_timeout(&addr, t).expect("connect to the portal");
        s.set_read_timeout(Some(t)).unwrap();
        s.set_write_timeout(Some(t)).unwrap();
        s.set_nodelay(true).unwrap();
        Raw(s)
    }

    /// Sends bytes; a target that already closed may refuse them.
    fn send(&mut self, b: &[u8]) {
        use std::io::Write as _;
        let _ = self.0.write_all(b);
    }

    /// The next PDU (BHS, data), or `None` once the target closed.
    fn pdu(&mut self) -> Option<([u8; 48], Vec<u8>)> {
        use std::io::Read as _;
        let mut h = [0u8; 48];
        match self.0.read_exact(&mut h) {
            Ok(()) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("the target neither answered nor closed in {RAW_SECS} s")
            }
            Err(_) => return None,
        }
        let dl = (usize::from(h[5]) << 16) | (usize::from(h[6]) << 8) | usize::from(h[7]);
        let mut d = vec![0u8; dl + (4 - dl % 4) % 4];
        self.0.read_exact(&mut d).ok()?;
        d.truncate(dl);
        Some((h, d))
    }

    /// The target closes the connection (after any PDUs it still sends);
    /// returns those PDUs' opcodes.
    fn closed(&mut self) -> Vec<u8> {
        let mut ops = Vec::new();
        while let Some((h, _)) = self.pdu() {
            ops.push(h[0] & 0x3f);
            assert!(ops.len() < 64, "the target keeps talking: {ops:02x?}");
        }
        ops
    }
}

/// A BHS: opcode (with the I bit as given), flags, ITT, CmdSN, data
/// segment length.
fn bhs(opcode: u8, flags: u8, itt: u32, cmd_sn: u32, dl: usize) -> [u8; 48] {
    let mut h = [0u8; 48];
    h[0] = opcode;
    h[1] = flags;
    h[5] = (dl >> 16) as u8;
    h[6] = (dl >> 8) as u8;
    h[7] = dl as u8;
    h[16..20].copy_from_slice(&itt.to_be_bytes());
    h[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    h
}

/// A Login Request (operational stage straight to full feature) for
/// `iqn`; `version` goes in Version-min.
fn login_pdu(iqn: &str, version: u8) -> Vec<u8> {
    let keys = format!(
        "InitiatorName=iqn.2026-12.org.strata:raw\0TargetName={iqn}\0SessionType=Normal\0\
         HeaderDigest=None\0DataDigest=None\0"
    );
    let mut h = bhs(0x43, 0x87, 0x10, 1, keys.len());
    h[3] = version;
    h[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0x52, 0x57]);
    let mut v = h.to_vec();
    v.extend_from_slice(keys.as_bytes());
    v.resize(v.len() + (4 - keys.len() % 4) % 4, 0);
    v
}

/// A raw session logged in to `iqn`.
fn raw_session(port: u16, iqn: &str) -> Raw {
    let mut r = Raw::connect(port);
    r.send(&login_pdu(iqn, 0));
    let (h, _) = r.pdu().expect("a login response");
    assert_eq!(h[0] & 0x3f, 0x23, "Login Response");
    assert_eq!(&h[36..38], &[0, 0], "login accepted");
    assert_eq!(h[1] & 0x83, 0x83, "full feature phase");
    r
}

/// Malformed PDUs on raw connections while a real client writes: garbage
/// headers, a huge DataSegmentLength, a Data-Out for a task that does not
/// exist, a SCSI Command before login, a login with a version the target
/// does not speak, PDUs cut short by a close. Each bad connection is
/// answered or dropped without hanging; afterwards the process still
/// serves, a second client reads the first one's pattern back unchanged,
/// and iSCSI and NBD both still work.
#[test]
fn malformed_pdus_leave_the_target_serving() {
    use strata_tests::iscsi_clients::Want;
    const IQN: &str = "iqn.2026-12.org.strata:malformed";
    let s = iscsi::serve(Strata(Hosted), &[Want::new(IQN, 8)], "export nbd vol md0\n");
    let a = s.strata.as_ref().unwrap();
    let lun = s.luns[0].clone();
    let port = lun.port;
    // The real client: a known pattern over the whole LUN, written in
    // pieces while the malformed traffic goes on, each piece read back.
    let writer = {
        let lun = lun.clone();
        std::thread::spawn(move || {
            let mut cmds = Vec::new();
            for i in 0..8 {
                cmds.push(format!("write -P 0xa5 {i}M 1M"));
                cmds.push(format!("read -P 0xa5 {i}M 1M"));
            }
            cmds.push("flush".into());
            let c: Vec<&str> = cmds.iter().map(String::as_str).collect();
            iscsi::qemu_io(&lun, false, &c)
        })
    };

    // Garbage: 48 bytes that are no PDU (opcode 0x3f), then more.
    let mut r = Raw::connect(port);
    let garbage: Vec<u8> = (0..480u32)
        .map(|i| (i.wrapping_mul(131) ^ 0x3f) as u8)
        .collect();
    r.send(&garbage);
    assert!(
        r.closed().is_empty(),
        "garbage is dropped without an answer"
    );

    // A login whose DataSegmentLength is 16 MiB - 1.
    let mut r = Raw::connect(port);
    let mut p = login_pdu(IQN, 0);
    p[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    r.send(&p);
    r.send(&[0u8; 4096]);
    assert!(
        r.closed().is_empty(),
        "a huge data segment ends the connection"
    );

    // A SCSI Command (READ(10)) before any login.
    let mut r = Raw::connect(port);
    let mut h = bhs(0x01, 0xc0, 7, 1, 0);
    h[20..24].copy_from_slice(&512u32.to_be_bytes());
    h[32..42].copy_from_slice(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    r.send(&h);
    assert!(
        r.closed().is_empty(),
        "a command before login is not served"
    );

    // A login with Version-min 1 (RFC 7143 knows only 0).
    let mut r = Raw::connect(port);
    r.send(&login_pdu(IQN, 1));
    let (h, _) = r.pdu().expect("a login response");
    assert_eq!(h[0] & 0x3f, 0x23, "Login Response");
    assert_eq!(&h[36..38], &[0x02, 0x05], "unsupported version");
    assert!(r.closed().is_empty());

    // Logged in: a Data-Out for an ITT no command has, then a ping that
    // must still be answered, then a DataSegmentLength above what was
    // negotiated.
    let mut r = raw_session(port, IQN);
    let mut h = bhs(0x05, 0x80, 0xdead_beef, 0, 512);
    h[20..24].copy_from_slice(&0x1234u32.to_be_bytes());
    r.send(&h);
    r.send(&[0x5a; 512]);
    let mut h = bhs(0x40, 0x80, 0x77, 1, 8);
    h[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
    r.send(&h);
    r.send(b"ping1234");
    let (h, d) = loop {
        let (h, d) = r.pdu().expect("the session still answers");
        if h[0] & 0x3f == 0x20 {
            break (h, d);
        }
        assert_eq!(h[0] & 0x3f, 0x3f, "only a Reject before the NOP-In");
    };
    assert_eq!(&h[16..20], &0x77u32.to_be_bytes(), "the ping's NOP-In");
    assert_eq!(d, b"ping1234");
    r.send(&bhs(0x41, 0x80, 0x78, 1, 0xff_ffff));
    r.send(&[0u8; 4096]);
    r.closed();

    // Cut short: half a BHS; a login's data segment half sent; a WRITE(10)
    // of 64 KiB with only part of its immediate data (pages held), each
    // then closed.
    let mut r = Raw::connect(port);
    r.send(&login_pdu(IQN, 0)[..20]);
    drop(r);
    let mut r = Raw::connect(port);
    let p = login_pdu(IQN, 0);
    r.send(&p[..p.len() - 20]);
    drop(r);
    let mut r = raw_session(port, IQN);
    let mut h = bhs(0x01, 0xa0, 9, 1, 65536);
    h[20..24].copy_from_slice(&65536u32.to_be_bytes());
    h[32..42].copy_from_slice(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 128, 0]);
    r.send(&h);
    r.send(&[0xee; 10_000]);
    drop(r);

    let w = writer.join().expect("the writer thread");
    assert!(
        iscsi::qemu_io_ok(&w),
        "the real client was served throughout: {}{}",
        w.stdout,
        w.stderr
    );
    // A second client: the pattern is all there, untouched by the cut
    // write; iSCSI logins work; NBD reads the same bytes.
    let o = iscsi::qemu_io(&lun, true, &["read -P 0xa5 0 8M"]);
    assert!(
        iscsi::qemu_io_ok(&o),
        "the pattern reads back over iSCSI: {}{}",
        o.stdout,
        o.stderr
    );
    let size = iscsi::login(&lun, iscsi::INITIATOR).expect("a new iSCSI login");
    assert_eq!(size, 8 << 20);
    strata_tests::qemu_io(&a.uri("vol"), &["read -P 0xa5 0 8M"]);
    assert!(a.status().is_object(), "the management endpoint answers");
}
