//! Tests of the NBD engine: handshake transcripts, transmission over a
//! real stack of md disks, and random input.

mod budget;
mod corpus;
mod features;
mod fuzz;
mod handshake;
mod transmission;

use super::wire::*;
use super::{Connection, ExportInfo, ServerConfig};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use geom::bio::ConsumerId;
use geom::class::md::MdGeom;
use geom::stack::Stack;

/// Size of every test export.
pub(super) const DISK: u64 = 1 << 20;

/// An export description as the platform would build it for an md disk.
pub(super) fn export(name: &str, read_only: bool) -> ExportInfo {
    ExportInfo {
        description: alloc::format!("{name} (md)"),
        read_only,
        max_block: 1 << 16,
        ..ExportInfo::md(name, DISK)
    }
}

/// Everything the server has to send, fetched in small pieces.
pub(super) fn drain(c: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1000];
    loop {
        let n = crate::session::copy_out(c, &mut buf);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// The fixed-newstyle greeting the server sends.
pub(super) fn greeting() -> Vec<u8> {
    let mut v = Vec::from(&b"NBDMAGICIHAVEOPT"[..]);
    v.extend_from_slice(&[0, 3]);
    v
}

/// A client option with its data.
pub(super) fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// An option reply as the server should send it.
pub(super) fn rep(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The data of NBD_OPT_INFO / NBD_OPT_GO.
pub(super) fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// A request header.
pub(super) fn req(command: Command, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let r = RequestRepr {
        flags,
        command,
        cookie,
        offset,
        length,
    };
    let mut v = alloc::vec![0u8; r.buffer_len()];
    r.emit(&mut RequestView::new_unchecked(&mut v[..]));
    v
}

/// A write request with its payload.
pub(super) fn write(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut v = req(Command::Write, flags, cookie, offset, data.len() as u32);
    v.extend_from_slice(data);
    v
}

/// A deterministic test pattern.
pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// The handshake of a client that negotiates NO_ZEROES, optionally
/// structured replies, and GOes to export `name`.
pub(super) fn handshake_bytes(name: &str, structured: bool) -> Vec<u8> {
    let mut v = Vec::from((FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    if structured {
        v.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    }
    v.extend(opt(OPT_GO, &go_data(name, &[])));
    v
}

/// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
pub(super) fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// One reply as a client decodes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub data: Vec<u8>,
    /// Error message of a structured error chunk.
    pub message: String,
}

/// A client's view of the reply stream: `reads` gives the length of each
/// outstanding read by cookie (simple replies cannot be decoded without).
pub(super) struct Decoder {
    pub structured: bool,
    pub reads: BTreeMap<u64, u32>,
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new(structured: bool) -> Decoder {
        Decoder {
            structured,
            reads: BTreeMap::new(),
            buf: Vec::new(),
        }
    }

    /// Adds received bytes and returns every complete reply.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Reply> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((reply, used)) = self.one() {
            self.buf.drain(..used);
            out.push(reply);
        }
        out
    }

    /// Bytes received but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    fn one(&mut self) -> Option<(Reply, usize)> {
        let b = &self.buf;
        if self.structured && b.len() >= 4 && b[..4] == STRUCTURED_REPLY_MAGIC.to_be_bytes() {
            let c = ChunkRepr::parse(&ChunkView::new_checked(&b[..]).ok()?).ok()?;
            let total = 20 + c.length as usize;
            if b.len() < total {
                return None;
            }
            assert_ne!(
                c.flags & REPLY_FLAG_DONE,
                0,
                "every reply here is one chunk"
            );
            let p = &b[20..total];
            let reply = match c.chunk_type {
                REPLY_TYPE_NONE => Reply {
                    cookie: c.cookie,
                    error: 0,
                    data: Vec::new(),
                    message: String::new(),
                },
                REPLY_TYPE_OFFSET_DATA => Reply {
                    cookie: c.cookie,
                    error: 0,
                    data: p[8..].to_vec(),
                    message: String::new(),
                },
                // Context id and descriptors, undecoded.
                REPLY_TYPE_BLOCK_STATUS => Reply {
                    cookie: c.cookie,
                    error: 0,
                    data: p.to_vec(),
                    message: String::new(),
                },
                REPLY_TYPE_ERROR => {
                    let mlen = u16::from_be_bytes([p[4], p[5]]) as usize;
                    assert_eq!(p.len(), 6 + mlen);
                    Reply {
                        cookie: c.cookie,
                        error: u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
                        data: Vec::new(),
                        message: String::from_utf8(p[6..].to_vec()).unwrap(),
                    }
                }
                t => panic!("unexpected chunk type {t}"),
            };
            self.reads.remove(&c.cookie);
            return Some((reply, total));
        }
        let s = SimpleReplyRepr::parse(&SimpleReplyView::new_checked(&b[..]).ok()?)
            .expect("reply magic");
        let data_len = match self.reads.get(&s.cookie) {
            Some(&n) if s.error == 0 => n as usize,
            _ => 0,
        };
        if b.len() < 16 + data_len {
            return None;
        }
        self.reads.remove(&s.cookie);
        Some((
            Reply {
                cookie: s.cookie,
                error: s.error,
                data: b[16..16 + data_len].to_vec(),
                message: String::new(),
            },
            16 + data_len,
        ))
    }
}

/// A connection over a stack of md disks: "disk" (read-write) and "ro"
/// (read-only), 1 MiB each.
pub(super) struct Harness {
    pub stack: Stack,
    pub exports: Vec<ExportInfo>,
    pub consumers: Vec<ConsumerId>,
    pub conn: Connection,
    pub decoder: Decoder,
}

impl Harness {
    /// A harness whose connection is in transmission on export `name`.
    pub fn new(cfg: ServerConfig, name: &str, structured: bool) -> Harness {
        Harness::with_handshake(cfg, &handshake_bytes(name, structured), structured)
    }

    /// A harness with structured replies and `base:allocation` selected,
    /// in transmission on export `name`.
    pub fn with_allocation(cfg: ServerConfig, name: &str) -> Harness {
        let mut hs = Vec::from((FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        hs.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        hs.extend(opt(
            OPT_SET_META_CONTEXT,
            &meta_data(name, &[BASE_ALLOCATION]),
        ));
        hs.extend(opt(OPT_GO, &go_data(name, &[])));
        Harness::with_handshake(cfg, &hs, true)
    }

    /// A harness whose connection has been fed the handshake `hs`.
    pub fn with_handshake(cfg: ServerConfig, hs: &[u8], structured: bool) -> Harness {
        let mut stack = Stack::new();
        MdGeom::create(&mut stack, "md0", DISK).unwrap();
        MdGeom::create(&mut stack, "md1", DISK).unwrap();
        let consumers = alloc::vec![
            stack.open("md0", geom::stack::Access::READ_WRITE).unwrap(),
            stack.open("md1", geom::stack::Access::READ).unwrap(),
        ];
        let exports = alloc::vec![export("disk", false), export("ro", true)];
        let mut h = Harness {
            stack,
            exports,
            consumers,
            conn: Connection::new(cfg),
            decoder: Decoder::new(structured),
        };
        assert_eq!(h.conn.on_recv(&h.exports, hs), hs.len());
        let out = drain(&mut h.conn);
        let ack = rep(OPT_GO, REP_ACK, &[]);
        assert!(out.ends_with(&ack), "GO acknowledged");
        assert!(h.conn.export().is_some());
        h
    }

    /// Moves bios through the stack and replies into the decoder's buffer.
    /// Returns the replies that came out and whether anything happened.
    pub fn pump(&mut self) -> (Vec<Reply>, bool) {
        let mut progress = false;
        while let Some(r) = self.conn.next_request() {
            progress = true;
            self.stack.submit(self.consumers[r.export], r.bio, r.cookie);
        }
        self.stack.run();
        while let Some((tag, bio, result)) = self.stack.take_completed() {
            progress = true;
            assert!(self.conn.complete(tag, bio, result));
        }
        let out = drain(&mut self.conn);
        progress |= !out.is_empty();
        (self.decoder.feed(&out), progress)
    }

    /// Feeds `bytes` in pieces of at most `piece` bytes, pumping between
    /// pieces, until all are consumed and nothing is left to do. Returns
    /// every reply.
    pub fn run(&mut self, bytes: &[u8], piece: usize) -> Vec<Reply> {
        let mut off = 0usize;
        let mut replies = Vec::new();
        loop {
            let end = off.saturating_add(piece).min(bytes.len());
            let used = self.conn.on_recv(&self.exports, &bytes[off..end]);
            off += used;
            let (r, progress) = self.pump();
            replies.extend(r);
            if !progress && (used == 0 || off == bytes.len()) {
                break;
            }
        }
        assert_eq!(off, bytes.len(), "all input consumed");
        replies
    }

    /// Registers a read so simple replies can be decoded.
    pub fn expect_read(&mut self, cookie: u64, len: u32) {
        self.decoder.reads.insert(cookie, len);
    }

    /// Reads `len` bytes at `offset` through the connection.
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Reply {
        self.expect_read(cookie, len);
        let r = self.run(&req(Command::Read, 0, cookie, offset, len), usize::MAX);
        assert_eq!(r.len(), 1);
        r.into_iter().next().unwrap()
    }

    /// Runs one request (with payload) and returns its single reply.
    pub fn one(&mut self, bytes: &[u8]) -> Reply {
        let r = self.run(bytes, usize::MAX);
        assert_eq!(r.len(), 1, "one reply");
        r.into_iter().next().unwrap()
    }
}
