//! NBD protocol scenarios for both platforms: real clients (qemu-img,
//! qemu-io, nbdinfo, nbdcopy, nbdsh, fio) and a small raw client for what
//! they cannot do (many connections, stalled readers, malformed input).

use crate::{client, qemu_io, qemu_io_any, root, Output, Platform, Start, TempDir};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

// ---- a raw NBD client (NBD proto.md) ----

/// `NBD_CMD_READ`.
pub const READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const BLOCK_STATUS: u16 = 7;

const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// One reply as the raw client decodes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// Cookie of the request.
    pub cookie: u64,
    /// NBD error value (0 for success).
    pub error: u32,
    /// Read data, or block status descriptors (length, flags).
    pub data: Vec<u8>,
    /// Block status descriptors.
    pub extents: Vec<(u32, u32)>,
}

/// A raw NBD connection in transmission.
pub struct RawNbd {
    /// The socket.
    pub s: TcpStream,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    structured: bool,
    reads: HashMap<u64, u32>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// A TCP connection to 127.0.0.1:`port` with a read timeout.
pub fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// An option in the fixed newstyle format.
pub fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Reads one option reply: (option, type, data).
pub fn option_reply(s: &mut TcpStream) -> io::Result<(u32, u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    assert_eq!(be64(&h), OPT_REPLY_MAGIC, "option reply magic");
    let mut data = vec![0u8; be32(&h[16..]) as usize];
    s.read_exact(&mut data)?;
    Ok((be32(&h[8..]), be32(&h[12..]), data))
}

/// A request header.
pub fn request(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

impl RawNbd {
    /// Connects and enters transmission on `export` with `NBD_OPT_GO`,
    /// negotiating structured replies and `base:allocation` if asked.
    pub fn connect(port: u16, export: &str, structured: bool) -> io::Result<RawNbd> {
        let mut s = tcp(port);
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet)?;
        assert_eq!(&greet[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes())?;
        if structured {
            s.write_all(&option(8, &[]))?;
            let (_, t, _) = option_reply(&mut s)?;
            assert_eq!(t, 1, "structured replies acknowledged");
            let mut d = (export.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&15u32.to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            s.write_all(&option(10, &d))?;
            loop {
                let (_, t, _) = option_reply(&mut s)?;
                if t == 1 {
                    break;
                }
                assert_eq!(t, 4, "meta context reply");
            }
        }
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&option(7, &d))?;
        let (mut size, mut flags) = (0, 0);
        loop {
            let (_, t, data) = option_reply(&mut s)?;
            match t {
                1 => break,
                3 if data[..2] == [0, 0] => {
                    size = be64(&data[2..]);
                    flags = u16::from_be_bytes([data[10], data[11]]);
                }
                3 => {}
                t => {
                    return Err(io::Error::other(format!("GO refused: {t:#x}")));
                }
            }
        }
        Ok(RawNbd {
            s,
            size,
            flags,
            structured,
            reads: HashMap::new(),
        })
    }

    /// Sends a request (with its payload, for a write).
    pub fn send(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        if cmd == READ {
            self.reads.insert(cookie, len);
        }
        let mut r = request(cmd, flags, cookie, offset, len);
        r.extend_from_slice(payload);
        self.s.write_all(&r).expect("send request");
    }

    /// Reads one whole reply (all chunks of a structured one).
    pub fn recv(&mut self) -> io::Result<Reply> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        let magic = be32(&m);
        if magic == SIMPLE_MAGIC {
            let mut h = [0u8; 12];
            self.s.read_exact(&mut h)?;
            let (error, cookie) = (be32(&h), be64(&h[4..]));
            let len = self.reads.remove(&cookie).unwrap_or(0);
            let mut data = vec![0u8; if error == 0 { len as usize } else { 0 }];
            self.s.read_exact(&mut data)?;
            return Ok(Reply {
                cookie,
                error,
                data,
                extents: Vec::new(),
            });
        }
        assert!(
            self.structured && magic == STRUCTURED_MAGIC,
            "reply magic {magic:#x}"
        );
        let mut reply = Reply::default();
        let mut first = true;
        loop {
            if !first {
                self.s.read_exact(&mut m)?;
                assert_eq!(be32(&m), STRUCTURED_MAGIC);
            }
            first = false;
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h)?;
            let flags = u16::from_be_bytes([h[0], h[1]]);
            let kind = u16::from_be_bytes([h[2], h[3]]);
            reply.cookie = be64(&h[4..]);
            let mut p = vec![0u8; be32(&h[12..]) as usize];
            self.s.read_exact(&mut p)?;
            match kind {
                0 => {}
                1 => reply.data.extend_from_slice(&p[8..]),
                5 => {
                    reply.extents = p[4..]
                        .chunks_exact(8)
                        .map(|d| (be32(d), be32(&d[4..])))
                        .collect()
                }
                k if k & 0x8000 != 0 => reply.error = be32(&p),
                k => panic!("unexpected chunk type {k}"),
            }
            if flags & 1 != 0 {
                self.reads.remove(&reply.cookie);
                return Ok(reply);
            }
        }
    }

    /// Sends one request and returns its reply.
    pub fn call(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> Reply {
        self.send(cmd, flags, 0x5eed, offset, len, payload);
        let r = self.recv().expect("reply");
        assert_eq!(r.cookie, 0x5eed);
        r
    }

    /// Reads `len` bytes at `offset`, asserting success.
    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let r = self.call(READ, 0, offset, len, &[]);
        assert_eq!(r.error, 0, "read at {offset}");
        r.data
    }

    /// Ends the session with `NBD_CMD_DISC`.
    pub fn disconnect(mut self) {
        let _ = self.s.write_all(&request(DISC, 0, 0, 0, 0));
    }
}

/// `NBD_EPERM`.
pub const EPERM: u32 = 1;
/// `NBD_FLAG_READ_ONLY` in the transmission flags.
const FLAG_READ_ONLY: u16 = 1 << 1;

/// The server itself refuses writes to read-only `export`: a raw client
/// (which, unlike qemu-io or nbdsh, does not refuse them locally) sends
/// a WRITE, a WRITE_ZEROES and a TRIM, on a simple and on a structured
/// connection, each answered EPERM, the data unchanged and the
/// connection still serving.
pub fn assert_read_only_refuses(port: u16, export: &str) {
    for structured in [false, true] {
        let mut c = RawNbd::connect(port, export, structured).expect("connect");
        assert_ne!(c.flags & FLAG_READ_ONLY, 0, "{export} is offered read-only");
        let before = c.read(0, 4096);
        let data = noise(4096, 0x0d0e);
        for (cmd, payload) in [(WRITE, &data[..]), (WRITE_ZEROES, &[][..]), (TRIM, &[][..])] {
            let r = c.call(cmd, 0, 0, 4096, payload);
            assert_eq!(r.error, EPERM, "command {cmd} on read-only {export}");
        }
        assert_eq!(c.read(0, 4096), before, "{export} unchanged");
        c.disconnect();
    }
}

/// True if the peer closed `s` (EOF or reset) within `limit`, having sent
/// nothing.
fn closed_without_data(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        ),
    }
}

/// A deterministic pseudo-random byte pattern (xorshift).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn disk(dir: &TempDir, name: &str, size: &str) -> String {
    format!("{},size={size}", dir.path(name).display())
}

/// Most NBD connections each platform serves at once
/// (`appliance::service::MAX_NBD_CONNECTIONS`, the same on both).
pub fn connection_limit(p: Platform) -> usize {
    match p {
        Platform::Hosted | Platform::Qemu => 32,
    }
}

/// Most management connections each platform serves at once
/// (`appliance::service::MAX_HTTP_CONNECTIONS`).
pub const HTTP_CONNECTION_LIMIT: usize = 16;

// ---- scenarios: many clients ----

/// Multi-conn semantics: every connection advertises CAN_MULTI_CONN; a
/// write acknowledged on one connection is read back on another, and a
/// FLUSH there succeeds after it; several writers at once each see all
/// others' data.
pub fn multi_conn(p: Platform) {
    let a = Start::new(p).spawn().expect("start");
    let mut c1 = RawNbd::connect(a.nbd_port, "md0", true).unwrap();
    let mut c2 = RawNbd::connect(a.nbd_port, "md0", false).unwrap();
    assert_ne!(c1.flags & (1 << 8), 0, "CAN_MULTI_CONN");
    assert_ne!(c2.flags & (1 << 8), 0, "CAN_MULTI_CONN");
    let data = noise(65536, 1);
    assert_eq!(c1.call(WRITE, 0, 1 << 20, 65536, &data).error, 0);
    assert_eq!(c2.call(FLUSH, 0, 0, 0, &[]).error, 0);
    assert_eq!(c2.read(1 << 20, 65536), data);
    // Interleaved writers on four connections, each checked on another.
    let mut conns: Vec<RawNbd> = (0..4)
        .map(|i| RawNbd::connect(a.nbd_port, "md0", i % 2 == 0).unwrap())
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        for k in 0..8u64 {
            let off = (8 << 20) + (k * 4 + i as u64) * 4096;
            c.send(WRITE, 0, k, off, 4096, &noise(4096, off));
        }
    }
    for c in conns.iter_mut() {
        for _ in 0..8 {
            assert_eq!(c.recv().unwrap().error, 0);
        }
    }
    assert_eq!(conns[3].call(FLUSH, 0, 0, 0, &[]).error, 0);
    for k in 0..32u64 {
        let off = (8 << 20) + k * 4096;
        assert_eq!(
            conns[(k as usize + 1) % 4].read(off, 4096),
            noise(4096, off)
        );
    }
    for c in conns {
        c.disconnect();
    }
    c1.disconnect();
    c2.disconnect();
}

/// A client that sends reads and never reads a reply does not slow the
/// others: while it sits stalled, another client streams 32 MiB both ways
/// and verifies it, and a third does small requests; the stalled one is
/// still owed its replies and gets them once it reads.
pub fn stalled_client(p: Platform) {
    let dir = TempDir::new("stall");
    let a = Start::new(p)
        .disk(disk(&dir, "d0.img", "64M"))
        .spawn()
        .expect("start");
    let mut stalled = RawNbd::connect(a.nbd_port, "vtbd0", false).unwrap();
    // 64 reads of 1 MiB: far more than the socket buffers hold.
    for i in 0..64u64 {
        stalled.send(READ, 0, i, (i % 32) << 20, 1 << 20, &[]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let src = dir.path("src.bin");
    std::fs::write(&src, noise(32 << 20, 9)).unwrap();
    let uri = a.uri("vtbd0");
    let o = client(
        "nbdcopy",
        &["--connections=2", &src.display().to_string(), &uri],
    );
    assert!(o.ok, "nbdcopy in: {}", o.stderr);
    let back = dir.path("back.bin");
    let o = client(
        "nbdcopy",
        &["--connections=2", &uri, &back.display().to_string()],
    );
    assert!(o.ok, "nbdcopy out: {}", o.stderr);
    let got = std::fs::read(&back).unwrap();
    assert!(
        got[..32 << 20] == noise(32 << 20, 9)[..],
        "data copied back"
    );
    let mut small = RawNbd::connect(a.nbd_port, "vtbd0", true).unwrap();
    for i in 0..50u64 {
        assert_eq!(small.read(i * 4096, 4096).len(), 4096);
    }
    eprintln!(
        "others served in {:?} while one client stalled",
        t.elapsed()
    );
    // The stalled client gets every reply once it reads.
    for _ in 0..64 {
        let r = stalled.recv().expect("stalled client's reply");
        assert_eq!((r.error, r.data.len()), (0, 1 << 20));
    }
    stalled.disconnect();
}

/// A connection limit with a clean refusal: with the limit reached, one
/// more client is closed before any byte (no hang); once a client leaves,
/// a new one is served.
pub fn connection_limit_refuses_cleanly(p: Platform) {
    let a = Start::new(p).spawn().expect("start");
    let limit = connection_limit(p);
    let mut conns: Vec<RawNbd> = (0..limit)
        .map(|i| {
            RawNbd::connect(a.nbd_port, "md0", false)
                .unwrap_or_else(|e| panic!("connection {i} of {limit}: {e}"))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = tcp(a.nbd_port);
    assert!(
        closed_without_data(&mut extra, Duration::from_secs(20)),
        "a client over the limit is closed at once"
    );
    // Everyone inside is still served.
    for c in conns.iter_mut().step_by(7) {
        assert_eq!(c.call(FLUSH, 0, 0, 0, &[]).error, 0);
    }
    conns.pop().unwrap().disconnect();
    let mut again = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(c) = RawNbd::connect(a.nbd_port, "md0", true) {
            again = Some(c);
            break;
        }
    }
    let mut c = again.expect("a new client is served once one left");
    assert_eq!(c.read(0, 512).len(), 512);
}

/// As many clients as the connection limit allows connect in the same
/// instant (threads released by one barrier): every one completes the
/// handshake and a verified write and read. One more, while they are all
/// connected, is closed at once without a byte; once one of them leaves, a
/// new client is served.
///
/// Behind QEMU's user networking this needs both halves of the fix: the
/// host tool deepens QEMU's one-deep accept queue (else the host kernel
/// drops the handshakes it cannot queue and those clients wait forever),
/// and the appliance keeps a socket listening for every connection the
/// limit allows (else smoltcp resets the attempts it has no socket for).
pub fn simultaneous_clients(p: Platform) {
    let a = Start::new(p).spawn().expect("start");
    let port = a.nbd_port;
    let limit = connection_limit(p);
    const BLOCK: u32 = 64 << 10;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(limit));
    let threads: Vec<_> = (0..limit)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut c = RawNbd::connect(port, "md0", false)
                    .unwrap_or_else(|e| panic!("client {i}: handshake: {e}"));
                let offset = i as u64 * u64::from(BLOCK);
                let data = noise(BLOCK as usize, 0x1000 + i as u64);
                assert_eq!(
                    c.call(WRITE, 0, offset, BLOCK, &data).error,
                    0,
                    "client {i}"
                );
                assert!(c.read(offset, BLOCK) == data, "client {i} reads its block");
                c
            })
        })
        .collect();
    let mut conns: Vec<RawNbd> = threads
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.join().unwrap_or_else(|_| panic!("client {i} failed")))
        .collect();
    // Every client sees every other's block: one stack behind them all.
    let last = conns.len() - 1;
    for i in 0..limit {
        let offset = i as u64 * u64::from(BLOCK);
        let want = noise(BLOCK as usize, 0x1000 + i as u64);
        assert!(conns[last - i].read(offset, BLOCK) == want, "block {i}");
    }
    let mut extra = tcp(port);
    assert!(
        closed_without_data(&mut extra, Duration::from_secs(20)),
        "a client over the limit is closed at once"
    );
    conns.pop().unwrap().disconnect();
    let mut again = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(c) = RawNbd::connect(port, "md0", false) {
            again = Some(c);
            break;
        }
    }
    let mut c = again.expect("a new client is served once one left");
    assert!(c.read(0, BLOCK) == noise(BLOCK as usize, 0x1000));
}

/// One HTTP/1.1 request on a fresh connection; the status code and body.
fn http_request(port: u16, method: &str, path: &str) -> io::Result<(u16, String)> {
    let mut s = tcp(port);
    write!(s, "{method} {path} HTTP/1.1\r\nHost: strata\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status line in {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    Ok((code, body))
}

/// The management port behaves like the NBD port: as many requests as its
/// connection limit allows, sent in the same instant, are all answered;
/// with the limit taken by idle connections one more is closed at once,
/// and once one of those leaves a request is answered again.
pub fn simultaneous_management(p: Platform) {
    let a = Start::new(p).spawn().expect("start");
    let port = a.http_port;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(HTTP_CONNECTION_LIMIT));
    let threads: Vec<_> = (0..HTTP_CONNECTION_LIMIT)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let (code, body) = http_request(port, "GET", "/status")
                    .unwrap_or_else(|e| panic!("request {i}: {e}"));
                assert_eq!(code, 200, "request {i}: {body}");
                assert!(body.contains("\"exports\""), "request {i}: {body}");
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        t.join().unwrap_or_else(|_| panic!("request {i} failed"));
    }
    // Idle connections up to the limit, all held by the server: one the
    // server did not take is closed at once, so once every connection
    // opened stays open, the server holds the limit.
    let mut idle: Vec<TcpStream> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        while idle.len() < HTTP_CONNECTION_LIMIT {
            idle.push(tcp(port));
        }
        std::thread::sleep(Duration::from_millis(500));
        idle.retain(|s| {
            !closed_without_data(&mut s.try_clone().unwrap(), Duration::from_millis(100))
        });
        if idle.len() == HTTP_CONNECTION_LIMIT {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server holds idle connections"
        );
    }
    let mut extra = tcp(port);
    assert!(
        closed_without_data(&mut extra, Duration::from_secs(10)),
        "a management client over the limit is closed at once"
    );
    drop(idle.pop());
    let mut answered = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        if let Ok((200, _)) = http_request(port, "GET", "/status") {
            answered = true;
            break;
        }
    }
    assert!(answered, "a request is answered once an idle client left");
    drop(idle);
}

/// Concurrent load through real clients: sixteen fio jobs (one NBD
/// connection each, all started together) write and read random blocks
/// of 4–64 KiB at queue depth 8 in their own 16 MiB regions and verify
/// every block by CRC32C.
pub fn fio_many_jobs(p: Platform) {
    let dir = TempDir::new("fiojobs");
    let a = Start::new(p)
        .disk(disk(&dir, "d0.img", "256M"))
        .spawn()
        .expect("start");
    fio_verified(
        &dir,
        &a.uri("vtbd0"),
        &["--rw=randrw", "--offset_increment=16M", "--numjobs=16"],
        16,
    );
}

/// Runs fio (`ioengine=nbd`, 4–64 KiB blocks at queue depth 8, 16 MiB per
/// job, CRC32C verification that stops at the first bad block) against
/// `uri` with `args` added, and asserts that each of its `jobs` jobs ended
/// without an error or a verification failure.
fn fio_verified(dir: &TempDir, uri: &str, args: &[&str], jobs: usize) {
    let out = dir.path("fio.txt");
    let uri_arg = format!("--uri={uri}");
    let out_arg = format!("--output={}", out.display());
    let mut argv = vec![
        "300",
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        &uri_arg,
        "--bsrange=4k-64k",
        "--iodepth=8",
        "--size=16M",
        "--verify=crc32c",
        "--verify_fatal=1",
        // No state file left in the working directory.
        "--verify_state_save=0",
        &out_arg,
    ];
    argv.extend_from_slice(args);
    let o = client("timeout", &argv);
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(o.ok, "fio on {uri}: {}{}{report}", o.stdout, o.stderr);
    assert_eq!(report.matches("err= 0").count(), jobs, "{uri}: {report}");
    assert!(
        !report.contains("verify failed") && !report.contains("bad magic"),
        "{uri}: {report}"
    );
}

/// A client that connects and says nothing is dropped after the 30 s
/// handshake timeout; one that finished its handshake is not.
pub fn handshake_timeout(p: Platform) {
    let a = Start::new(p).spawn().expect("start");
    let mut silent = tcp(a.nbd_port);
    let mut greet = [0u8; 18];
    silent.read_exact(&mut greet).unwrap();
    let mut working = RawNbd::connect(a.nbd_port, "md0", false).unwrap();
    let t = Instant::now();
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut b = [0u8; 1];
    let n = silent.read(&mut b).unwrap_or(0);
    let waited = t.elapsed();
    assert_eq!(n, 0, "closed, not answered");
    assert!(
        waited > Duration::from_secs(25) && waited < Duration::from_secs(45),
        "dropped after about 30 s, not {waited:?}"
    );
    assert_eq!(working.call(FLUSH, 0, 0, 0, &[]).error, 0);
}

// ---- scenarios: real clients ----

/// The config of the real-client scenarios: a 64 MiB md exported
/// read-write (`md0`) and read-only (`ro`), and the disk (`disk`).
pub const CLIENTS_CONFIG: &str = "\
md create -s 64m md0
export nbd md0 md0
export nbd ro md0 ro
export nbd disk vtbd0
";

/// Starts Strata with [`CLIENTS_CONFIG`] and a 64 MiB disk.
fn start_clients(p: Platform, dir: &TempDir) -> crate::Appliance {
    Start::new(p)
        .disk(disk(dir, "d0.img", "64M"))
        .config(CLIENTS_CONFIG)
        .spawn()
        .expect("start")
}

fn ok(o: Output, what: &str) -> String {
    assert!(o.ok, "{what} failed: {}{}", o.stdout, o.stderr);
    o.stdout
}

/// `qemu-img info`, `convert` in and out, `compare` and `map` over `nbd://`.
pub fn qemu_img(p: Platform) {
    let dir = TempDir::new("qimg");
    let a = start_clients(p, &dir);
    let (md, d) = (a.uri("md0"), a.uri("disk"));
    let info = ok(
        client("qemu-img", &["info", "--output=json", &d]),
        "qemu-img info",
    );
    assert!(info.contains("\"virtual-size\": 67108864"), "{info}");
    // In: a sparse local image with data in two places.
    let src = dir.path("src.img");
    std::fs::write(&src, vec![0u8; 8 << 20]).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&noise(1 << 20, 3), 1 << 20).unwrap();
    f.write_all_at(&noise(64 << 10, 4), 6 << 20).unwrap();
    drop(f);
    let s = src.display().to_string();
    ok(
        client(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", &s, &md],
        ),
        "convert in",
    );
    ok(
        client("qemu-img", &["compare", "-f", "raw", "-F", "raw", &s, &md]),
        "compare",
    );
    // Out, and compare the copy.
    let out = dir.path("out.img");
    let o = out.display().to_string();
    ok(
        client("qemu-img", &["convert", "-f", "raw", "-O", "raw", &md, &o]),
        "convert out",
    );
    let got = std::fs::read(&out).unwrap();
    let want = std::fs::read(&src).unwrap();
    assert_eq!(got.len(), 64 << 20);
    assert!(got[..8 << 20] == want[..], "converted out matches");
    assert!(got[8 << 20..].iter().all(|&b| b == 0));
    // The map shows the md's holes: data only where something was written.
    let map = ok(
        client("qemu-img", &["map", "-f", "raw", "--output=json", &md]),
        "map",
    );
    let v: serde_json::Value = serde_json::from_str(&map).expect("map is JSON");
    let data: Vec<(u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, [(1 << 20, 1 << 20), (6 << 20, 64 << 10)], "{map}");
    // Convert a disk export to itself through nbd both ways.
    ok(
        client(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", &md, &d],
        ),
        "convert nbd to nbd",
    );
    ok(
        client("qemu-img", &["compare", "-f", "raw", "-F", "raw", &md, &d]),
        "compare nbd with nbd",
    );
}

/// `qemu-io` pattern writes and reads, discard and write-zeroes, with and
/// without FUA, on the md and the disk.
pub fn qemu_io_commands(p: Platform) {
    let dir = TempDir::new("qio");
    let a = start_clients(p, &dir);
    for uri in [a.uri("md0"), a.uri("disk")] {
        qemu_io(
            &uri,
            &[
                "write -P 0xa1 0 256k",
                "write -f -P 0xa2 256k 256k",
                "aio_write -P 0xa3 1M 64k",
                "aio_flush",
                "read -P 0xa1 0 256k",
                "read -P 0xa2 256k 256k",
                "read -P 0xa3 1M 64k",
                "discard 64k 64k",
                "read -P 0 64k 64k",
                "write -z 128k 64k",
                "write -z -f 192k 32k",
                "write -z -u 224k 32k",
                "read -P 0 128k 128k",
                "read -P 0xa1 0 64k",
                "read -P 0xa2 256k 256k",
                "flush",
            ],
        );
        // Unaligned requests are done by qemu with read-modify-write.
        qemu_io(&uri, &["write -P 0x5c 100 1000", "read -P 0x5c 100 1000"]);
    }
    // The read-only export refuses writes: qemu-io refuses them itself,
    // so the server's refusal is checked with a raw client.
    let o = qemu_io_any(&a.uri("ro"), &["write -P 1 0 4k"]);
    let text = o.stdout + &o.stderr;
    assert!(
        !o.ok || text.contains("failed") || text.contains("read-only"),
        "{text}"
    );
    assert_read_only_refuses(a.nbd_port, "ro");
}

/// `nbdinfo --json`, `--list` and `--map`.
pub fn nbdinfo(p: Platform) {
    let dir = TempDir::new("ninfo");
    let a = start_clients(p, &dir);
    let json = ok(
        client("nbdinfo", &["--json", &a.uri("md0")]),
        "nbdinfo --json",
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 64 << 20, "{json}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_df",
        "can_cache",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag}: {json}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert!(
        e["contexts"].to_string().contains("base:allocation"),
        "{json}"
    );
    let ro = ok(client("nbdinfo", &["--json", &a.uri("ro")]), "nbdinfo ro");
    let v: serde_json::Value = serde_json::from_str(&ro).expect("JSON");
    assert_eq!(v["exports"][0]["is_read_only"], true, "{ro}");
    assert_eq!(v["exports"][0]["can_trim"], false, "{ro}");

    let list = ok(
        client("nbdinfo", &["--list", "--json", &a.uri("")]),
        "nbdinfo --list",
    );
    let v: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["md0", "ro", "disk"], "{list}");
    assert!(list.contains("md0 (md)"), "descriptions: {list}");

    qemu_io(&a.uri("md0"), &["write -P 7 1M 512k", "discard 1M 128k"]);
    let map = ok(
        client("nbdinfo", &["--map", &a.uri("md0")]),
        "nbdinfo --map",
    );
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let want = [
        ["0", "1179648", "3"],
        ["1179648", "393216", "0"],
        ["1572864", "65536000", "3"],
    ];
    assert_eq!(rows.len(), 3, "{map}");
    for (r, w) in rows.iter().zip(want) {
        assert_eq!(&r[..3], &w[..], "{map}");
    }
    let total = ok(
        client("nbdinfo", &["--map", "--totals", &a.uri("disk")]),
        "nbdinfo --map --totals",
    );
    assert!(!total.trim().is_empty(), "{total}");
}

/// `nbdcopy` with four connections, in and out of the md and the disk,
/// checked byte for byte.
pub fn nbdcopy(p: Platform) {
    let dir = TempDir::new("ncopy");
    let a = start_clients(p, &dir);
    let mb = if p == Platform::Qemu { 16 } else { 48 };
    let src = dir.path("src.bin");
    let data = noise(mb << 20, 11);
    std::fs::write(&src, &data).unwrap();
    for export in ["md0", "disk"] {
        let uri = a.uri(export);
        let s = src.display().to_string();
        ok(
            client("nbdcopy", &["--connections=4", "--requests=16", &s, &uri]),
            "nbdcopy in",
        );
        let back = dir.path("back.bin");
        let _ = std::fs::remove_file(&back);
        let b = back.display().to_string();
        ok(
            client("nbdcopy", &["--connections=4", &uri, &b]),
            "nbdcopy out",
        );
        let got = std::fs::read(&back).unwrap();
        assert_eq!(got.len(), 64 << 20);
        assert!(got[..data.len()] == data[..], "{export}: data copied back");
        // Export to export, then compare.
        ok(
            client(
                "nbdcopy",
                &["--connections=2", &a.uri("md0"), &a.uri("disk")],
            ),
            "nbdcopy nbd to nbd",
        );
    }
    ok(
        client(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &a.uri("md0"),
                &a.uri("disk"),
            ],
        ),
        "compare after copy",
    );
}

/// The nbdsh script `tests/nbdsh/commands.py`: every command and flag,
/// structured reads, block status after trim and zero, the error cases.
pub fn nbdsh_commands(p: Platform) {
    let dir = TempDir::new("nbdsh");
    let a = start_clients(p, &dir);
    let script = root().join("tests/nbdsh/commands.py");
    // nbdsh runs the first python3 in PATH; libnbd's module is Debian's.
    let path = format!(
        "/usr/bin:/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("timeout")
        .arg("180")
        .arg("nbdsh")
        .arg("-n")
        .args(["-c", &format!("rw = {:?}", a.uri("md0"))])
        .args(["-c", &format!("ro = {:?}", a.uri("ro"))])
        .args(["-c", &format!("disk = {:?}", a.uri("disk"))])
        .args([
            "-c",
            &format!("exec(open({:?}).read())", script.display().to_string()),
        ])
        .env("PATH", path)
        .output()
        .expect("run nbdsh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("ok"), "nbdsh: {text}");
}

/// fio with its NBD engine (libnbd): random writes of mixed sizes at
/// queue depth 8, verified by checksum on read-back.
pub fn fio_verify(p: Platform) {
    let dir = TempDir::new("fio");
    let a = start_clients(p, &dir);
    for export in ["md0", "disk"] {
        fio_verified(
            &dir,
            &a.uri(export),
            &["--rw=randwrite", "--do_verify=1"],
            1,
        );
    }
}

// ---- robustness: malformed input against a live server ----

/// A small deterministic generator for the malformed-input scenario.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Writes `bytes` and reads whatever comes back until the server closes
/// or goes quiet; returns what came.
fn poke(port: u16, bytes: &[u8], quiet: Duration) -> Vec<u8> {
    let mut s = tcp(port);
    s.set_read_timeout(Some(quiet)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// A client's handshake up to (not including) its `NBD_OPT_GO` reply.
fn go_bytes(export: &str) -> Vec<u8> {
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend(option(8, &[]));
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    v.extend(option(7, &d));
    v
}

/// Random and truncated handshakes, bad magic, lengths past the end,
/// oversized requests, odd cookies and commands after DISC, from many
/// connections: afterwards every connection is gone, other clients are
/// served and no data changed.
pub fn malformed_clients(p: Platform) {
    let dir = TempDir::new("malformed");
    let a = start_clients(p, &dir);
    let port = a.nbd_port;
    let (md, d) = (a.uri("md0"), a.uri("disk"));
    qemu_io(&md, &["write -P 0x3c 0 1M"]);
    qemu_io(&d, &["write -P 0xc3 0 1M"]);
    let quiet = Duration::from_millis(if p == Platform::Qemu { 1500 } else { 300 });
    let mut g = Gen(0x5eed_1234_9876_abcd);

    // Random bytes from the first byte on, and after a valid greeting.
    for i in 0..24 {
        let len = 1 + g.below(if i % 2 == 0 { 64 } else { 4096 }) as usize;
        let junk: Vec<u8> = (0..len).map(|_| g.next() as u8).collect();
        poke(port, &junk, quiet / 3);
    }
    // Valid handshakes cut at every kind of point, then hung up.
    let hs = go_bytes("md0");
    for _ in 0..16 {
        let cut = g.below(hs.len() as u64) as usize;
        let mut s = tcp(port);
        let _ = s.write_all(&hs[..cut]);
        drop(s);
    }
    // Valid start, random options after it.
    for _ in 0..16 {
        let mut v = 3u32.to_be_bytes().to_vec();
        let code = [1u32, 3, 6, 7, 8, 9, 10, 0x4242][g.below(8) as usize];
        let len = [0u32, 3, 17, 70_000, u32::MAX][g.below(5) as usize];
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&code.to_be_bytes());
        opt.extend_from_slice(&len.to_be_bytes());
        let body: Vec<u8> = (0..(len.min(2000)) as usize)
            .map(|_| g.next() as u8)
            .collect();
        opt.extend_from_slice(&body);
        v.extend(opt);
        poke(port, &v, quiet / 3);
    }
    // Bad option magic: the server hangs up without a reply (a hard
    // disconnect drops even a greeting not yet sent).
    let mut v = 3u32.to_be_bytes().to_vec();
    v.extend_from_slice(b"IHAVEOPX");
    v.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 0]);
    let got = poke(port, &v, quiet);
    assert!(
        got.len() <= 18,
        "nothing but the greeting before the hang-up"
    );
    // Option data too long to buffer: NBD_REP_ERR_TOO_BIG once skipped.
    {
        let mut s = tcp(port);
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s.write_all(&option(7, &vec![0u8; 100_000])).unwrap();
        let (o, t, _) = option_reply(&mut s).unwrap();
        assert_eq!((o, t), (7, (1 << 31) + 9), "NBD_REP_ERR_TOO_BIG");
        s.write_all(&option(2, &[])).unwrap();
        assert_eq!(option_reply(&mut s).unwrap().1, 1, "ABORT acked");
    }

    // Transmission: each of these on its own connection.
    let size = 64u64 << 20;
    let mut c = RawNbd::connect(port, "md0", true).unwrap();
    // Lengths past the end, and offsets that overflow.
    for (cmd, off, len, want) in [
        (READ, size, 4096, 22),
        (READ, u64::MAX - 511, 1024, 22),
        (TRIM, size - 512, 1024, 22),
        (WRITE_ZEROES, size - 512, 1024, 28),
        (BLOCK_STATUS, size, 512, 22),
        (CACHE, u64::MAX, 512, 22),
        (99, 0, 0, 22),
    ] {
        let r = c.call(cmd, 0, off, len, &[]);
        assert_eq!(r.error, want, "cmd {cmd} at {off}+{len}");
    }
    let r = c.call(WRITE, 0, size - 512, 4096, &noise(4096, 1));
    assert_eq!(r.error, 28, "write past the end");
    // Oversized: a read over the maximum payload is refused, not done.
    assert_eq!(c.call(READ, 0, 0, 64 << 20, &[]).error, 75, "EOVERFLOW");
    // An oversized write is refused once its payload went by, unwritten.
    let big = noise(33 << 20, 2);
    let r = c.call(WRITE, 0, 0, big.len() as u32, &big);
    assert_eq!(r.error, 22, "oversized write");
    // Odd cookies come back as sent, each once, even repeated.
    for cookie in [0u64, u64::MAX, 7, 7, 1 << 63] {
        c.send(READ, 0, cookie, 0, 512, &[]);
    }
    let mut cookies: Vec<u64> = (0..5).map(|_| c.recv().unwrap().cookie).collect();
    cookies.sort_unstable();
    assert_eq!(cookies, [0, 7, 7, 1 << 63, u64::MAX]);
    // Bad request magic: hung up.
    let mut bad = request(READ, 0, 1, 0, 512);
    bad[0] ^= 0xff;
    c.s.write_all(&bad).unwrap();
    assert!(closed_without_data(&mut c.s, Duration::from_secs(20)));
    // A write after DISC is never done.
    let mut c = RawNbd::connect(port, "disk", false).unwrap();
    let mut v = request(DISC, 0, 1, 0, 0);
    v.extend(request(WRITE, 0, 2, 0, 4096));
    v.extend(noise(4096, 3));
    v.extend(request(TRIM, 0, 3, 0, 1 << 20));
    let _ = c.s.write_all(&v);
    assert!(closed_without_data(&mut c.s, Duration::from_secs(20)));
    // A write header followed by part of its payload, then hung up.
    let mut c = RawNbd::connect(port, "md0", false).unwrap();
    let mut v = request(WRITE, 0, 1, 0, 65536);
    v.extend(noise(1000, 4));
    let _ = c.s.write_all(&v);
    drop(c);
    // A truncated request header, then hung up.
    let mut c = RawNbd::connect(port, "disk", true).unwrap();
    let _ = c.s.write_all(&request(WRITE, 0, 1, 0, 512)[..17]);
    drop(c);
    // Random requests with valid magic on a live connection.
    let mut c = RawNbd::connect(port, "ro", true).unwrap();
    for i in 0..64u64 {
        let mut r = request(
            g.below(10) as u16,
            g.next() as u16,
            i,
            g.next() % (size * 2),
            g.below(1 << 17) as u32,
        );
        if u16::from_be_bytes([r[6], r[7]]) == WRITE {
            r[6..8].copy_from_slice(&READ.to_be_bytes());
        }
        if u16::from_be_bytes([r[6], r[7]]) == DISC {
            continue;
        }
        c.s.write_all(&r).unwrap();
        c.reads.insert(i, be32(&r[24..]));
        let rep = c.recv().expect("reply to a random request");
        assert_eq!(rep.cookie, i);
    }
    c.disconnect();

    // Every malformed connection is gone...
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let st = a.status();
        if st["connections"]["nbd"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "connections left: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // ...another client is served, and no data changed.
    qemu_io(&md, &["read -P 0x3c 0 1M", "read -P 0 1M 1M"]);
    qemu_io(&d, &["read -P 0xc3 0 1M", "read -P 0 1M 1M"]);
    let tail = RawNbd::connect(port, "md0", false)
        .unwrap()
        .read(size - 4096, 4096);
    assert_eq!(tail, vec![0; 4096]);
}
