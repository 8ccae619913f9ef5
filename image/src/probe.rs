//! Readiness probe: an NBD fixed-newstyle handshake that ends with
//! `NBD_OPT_ABORT` (NBD proto.md, "Fixed newstyle negotiation").
//!
//! A TCP connect alone proves nothing behind QEMU's `hostfwd`, which
//! accepts at once whether or not the guest listens; the server's greeting
//! does.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `NBDMAGIC`, the first word of the server's greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, the newstyle magic and the option-request magic.
pub const NBD_IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic (proto.md, "Option reply").
pub const NBD_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Handshake flag: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Option: end the negotiation without choosing an export.
pub const NBD_OPT_ABORT: u32 = 2;

/// Why a probe failed.
#[derive(Debug)]
pub enum ProbeError {
    /// The TCP connection failed.
    Connect(io::Error),
    /// Reading or writing failed (a timeout is `WouldBlock`/`TimedOut`).
    Io(io::Error),
    /// The peer closed the connection before a whole greeting.
    Closed,
    /// The greeting is not an NBD fixed-newstyle greeting.
    BadGreeting([u8; 18]),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Connect(e) => write!(f, "connect: {e}"),
            ProbeError::Io(e) if is_timeout(e) => write!(f, "no NBD greeting in time"),
            ProbeError::Io(e) => write!(f, "{e}"),
            ProbeError::Closed => write!(f, "connection closed before the NBD greeting"),
            ProbeError::BadGreeting(g) => write!(f, "not an NBD fixed-newstyle greeting: {g:02x?}"),
        }
    }
}

impl std::error::Error for ProbeError {}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The 18-byte server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn parse_greeting(g: &[u8; 18]) -> Option<u16> {
    let magic = u64::from_be_bytes(g[0..8].try_into().ok()?);
    let newstyle = u64::from_be_bytes(g[8..16].try_into().ok()?);
    let flags = u16::from_be_bytes([g[16], g[17]]);
    (magic == NBD_MAGIC && newstyle == NBD_IHAVEOPT && flags & NBD_FLAG_FIXED_NEWSTYLE != 0)
        .then_some(flags)
}

/// The client's answer to a greeting with `server_flags`: its flags, then
/// an `NBD_OPT_ABORT` request with no data (20 + 4 bytes).
pub fn abort_request(server_flags: u16) -> [u8; 20] {
    let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    // A client sets only flags the server offered (proto.md).
    if server_flags & NBD_FLAG_NO_ZEROES != 0 {
        client_flags |= NBD_FLAG_C_NO_ZEROES;
    }
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&client_flags.to_be_bytes());
    out[4..12].copy_from_slice(&NBD_IHAVEOPT.to_be_bytes());
    out[12..16].copy_from_slice(&NBD_OPT_ABORT.to_be_bytes());
    out[16..20].copy_from_slice(&0u32.to_be_bytes());
    out
}

/// Connects to `addr`, reads the greeting, and aborts the negotiation.
/// Every step is bounded by `timeout`. Succeeds once a valid greeting has
/// arrived and the abort was sent; the server's acknowledgement is read if
/// it comes quickly but not required.
pub fn nbd_handshake(addr: SocketAddr, timeout: Duration) -> Result<u16, ProbeError> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(ProbeError::Connect)?;
    s.set_read_timeout(Some(timeout)).map_err(ProbeError::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(ProbeError::Io)?;
    let _ = s.set_nodelay(true);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => ProbeError::Closed,
        _ => ProbeError::Io(e),
    })?;
    let flags = parse_greeting(&g).ok_or(ProbeError::BadGreeting(g))?;
    s.write_all(&abort_request(flags)).map_err(ProbeError::Io)?;
    // The server answers NBD_REP_ACK and closes; read it briefly so that
    // the close is orderly on both sides, but do not insist.
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut reply = [0u8; 20];
    let _ = s.read(&mut reply);
    let _ = s.shutdown(std::net::Shutdown::Both);
    Ok(flags)
}

/// The initiator name the iSCSI probe logs in with.
pub const ISCSI_PROBE_INITIATOR: &str = "iqn.2026-12.org.strata:probe";

/// A Login Request PDU (RFC 7143 §11.12) opening a discovery session
/// without authentication and asking for full feature phase at once:
/// CSG=0 (security negotiation, the stage `AuthMethod` belongs to),
/// NSG=3, T=1. Starting in the operational stage (CSG=1) instead would
/// make `AuthMethod` a key out of its stage, which a target may refuse
/// (with an initiator error), and one that wants the security stage
/// refuses it even without the key.
pub fn iscsi_login_request() -> Vec<u8> {
    let text =
        format!("InitiatorName={ISCSI_PROBE_INITIATOR}\0SessionType=Discovery\0AuthMethod=None\0");
    let mut pdu = vec![0u8; 48];
    pdu[0] = 0x40 | 0x03; // immediate, Login Request
    pdu[1] = 0x80 | 3; // T, CSG=0, NSG=3
    let len = text.len() as u32;
    pdu[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    // ISID: random format (T=0b10), then fixed bytes; TSIH 0 (a new session).
    pdu[8..14].copy_from_slice(&[0x80, 0x00, 0x53, 0x54, 0x52, 0x41]);
    pdu[16..20].copy_from_slice(&1u32.to_be_bytes()); // ITT
    pdu[24..28].copy_from_slice(&1u32.to_be_bytes()); // CmdSN
    pdu.extend_from_slice(text.as_bytes());
    pdu.resize(pdu.len().next_multiple_of(4), 0);
    pdu
}

/// Checks a Login Response basic header segment: `Ok` for status class 0
/// (success), an error naming the class and detail otherwise.
pub fn parse_login_response(bhs: &[u8; 48]) -> Result<(), String> {
    if bhs[0] & 0x3f != 0x23 {
        return Err(format!(
            "answered opcode 0x{:02x}, not a Login Response",
            bhs[0] & 0x3f
        ));
    }
    match (bhs[36], bhs[37]) {
        (0, _) => Ok(()),
        (class, detail) => Err(format!(
            "login refused: status class 0x{class:02x}, detail 0x{detail:02x}"
        )),
    }
}

/// Logs in to the iSCSI target at `addr` as a discovery session (see
/// [`iscsi_login_request`]) and checks that the answer is a successful
/// Login Response; each step waits at most `timeout`.
pub fn iscsi_login(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    let io = |e: io::Error| {
        if is_timeout(&e) {
            String::from("no Login Response in time")
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            String::from("connection closed before a Login Response")
        } else {
            e.to_string()
        }
    };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.write_all(&iscsi_login_request()).map_err(io)?;
    let mut bhs = [0u8; 48];
    s.read_exact(&mut bhs).map_err(io)?;
    parse_login_response(&bhs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    fn greeting(flags: u16) -> Vec<u8> {
        let mut g = Vec::new();
        g.extend_from_slice(b"NBDMAGIC");
        g.extend_from_slice(b"IHAVEOPT");
        g.extend_from_slice(&flags.to_be_bytes());
        g
    }

    #[test]
    fn magic_constants_spell_their_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&NBD_IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn greeting_parse() {
        let g: [u8; 18] = greeting(3).try_into().unwrap();
        assert_eq!(parse_greeting(&g), Some(3));
        let old: [u8; 18] = greeting(0).try_into().unwrap();
        assert_eq!(parse_greeting(&old), None);
        let mut bad = g;
        bad[0] = b'X';
        assert_eq!(parse_greeting(&bad), None);
    }

    #[test]
    fn abort_request_layout() {
        let r = abort_request(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        assert_eq!(&r[0..4], &[0, 0, 0, 3]);
        assert_eq!(&r[4..12], b"IHAVEOPT");
        assert_eq!(&r[12..16], &[0, 0, 0, 2]);
        assert_eq!(&r[16..20], &[0, 0, 0, 0]);
        let r = abort_request(NBD_FLAG_FIXED_NEWSTYLE);
        assert_eq!(&r[0..4], &[0, 0, 0, 1]);
    }

    #[test]
    fn handshake_against_a_fake_server() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            c.write_all(&greeting(3)).unwrap();
            let mut req = [0u8; 20];
            c.read_exact(&mut req).unwrap();
            // NBD_REP_ACK for NBD_OPT_ABORT.
            let mut rep = Vec::new();
            rep.extend_from_slice(&NBD_REPLY_MAGIC.to_be_bytes());
            rep.extend_from_slice(&NBD_OPT_ABORT.to_be_bytes());
            rep.extend_from_slice(&1u32.to_be_bytes());
            rep.extend_from_slice(&0u32.to_be_bytes());
            c.write_all(&rep).unwrap();
            req
        });
        let flags = nbd_handshake(addr, Duration::from_secs(2)).unwrap();
        assert_eq!(flags, 3);
        assert_eq!(server.join().unwrap(), abort_request(3));
    }

    #[test]
    fn silent_server_times_out() {
        // What QEMU's hostfwd looks like before the guest listens.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            thread::sleep(Duration::from_millis(600));
            drop(c);
        });
        let e = nbd_handshake(addr, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(&e, ProbeError::Io(io) if is_timeout(io)), "{e:?}");
        assert_eq!(e.to_string(), "no NBD greeting in time");
        server.join().unwrap();
    }

    #[test]
    fn closing_server_is_reported() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            drop(c);
        });
        let e = nbd_handshake(addr, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(e, ProbeError::Closed), "{e:?}");
        server.join().unwrap();
    }

    #[test]
    fn wrong_protocol_is_reported() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            c.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        });
        let e = nbd_handshake(addr, Duration::from_secs(2)).unwrap_err();
        assert!(matches!(e, ProbeError::BadGreeting(_)), "{e:?}");
        server.join().unwrap();
    }

    #[test]
    fn nobody_listening() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = nbd_handshake(addr, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ProbeError::Connect(_)), "{e:?}");
    }

    #[test]
    fn iscsi_login_request_layout() {
        let pdu = iscsi_login_request();
        assert_eq!(pdu.len() % 4, 0);
        assert_eq!(&pdu[..2], &[0x43, 0x83]);
        let len = u32::from_be_bytes([0, pdu[5], pdu[6], pdu[7]]) as usize;
        let text = std::str::from_utf8(&pdu[48..48 + len]).unwrap();
        assert_eq!(
            text,
            "InitiatorName=iqn.2026-12.org.strata:probe\0SessionType=Discovery\0AuthMethod=None\0"
        );
        assert!(pdu[48 + len..].iter().all(|&b| b == 0));
        assert_eq!(pdu[8] >> 6, 0b10, "random ISID format");
        assert_eq!(&pdu[14..16], &[0, 0], "TSIH 0: a new session");
    }

    #[test]
    fn iscsi_login_response_status() {
        let mut bhs = [0u8; 48];
        bhs[0] = 0x23;
        assert_eq!(parse_login_response(&bhs), Ok(()));
        bhs[36] = 0x02;
        bhs[37] = 0x01;
        assert_eq!(
            parse_login_response(&bhs),
            Err("login refused: status class 0x02, detail 0x01".into())
        );
        bhs[0] = 0x3f;
        assert!(parse_login_response(&bhs)
            .unwrap_err()
            .contains("not a Login Response"));
    }

    #[test]
    fn iscsi_login_against_a_listener() {
        use std::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            // One that answers, one that closes at once.
            let (mut c, _) = l.accept().unwrap();
            let mut req = vec![0u8; iscsi_login_request().len()];
            c.read_exact(&mut req).unwrap();
            let mut bhs = [0u8; 48];
            bhs[0] = 0x23;
            bhs[1] = 0x83;
            c.write_all(&bhs).unwrap();
            drop(l.accept().unwrap());
        });
        assert_eq!(iscsi_login(addr, Duration::from_secs(5)), Ok(()));
        let e = iscsi_login(addr, Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("closed") || e.contains("reset"), "{e}");
        t.join().unwrap();
    }
}
