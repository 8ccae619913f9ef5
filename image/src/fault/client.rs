//! A pipelined NBD client for the campaign's workload: fixed newstyle
//! negotiation with `NBD_OPT_GO`, then simple replies (NBD proto.md,
//! "Transmission"). Requests go out from the caller's thread; replies are
//! read by a thread of their own, so any number can be in flight.
//!
//! A read's length travels in the upper half of its cookie, so the reply
//! reader knows how much data follows without sharing state.

use net::nbd::wire::{
    Command, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC,
    OPTION_REPLY_MAGIC, OPT_GO, REP_ACK, REP_INFO, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::Duration;

/// A reply.
#[derive(Debug)]
pub struct Reply {
    /// The request's cookie.
    pub cookie: u64,
    /// The NBD error (0: success; 5 EIO, 28 ENOSPC, …).
    pub error: u32,
    /// A read's data (empty otherwise, or on error).
    pub data: Vec<u8>,
}

/// A negotiated connection.
pub struct Client {
    out: BufWriter<TcpStream>,
    replies: Receiver<io::Result<Reply>>,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    next: u32,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Client {
    /// Connects to `addr` and opens `export`; every handshake step is
    /// bounded by `timeout`.
    pub fn connect(addr: SocketAddr, export: &str, timeout: Duration) -> io::Result<Client> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut r = s.try_clone()?;
        let mut w = s.try_clone()?;
        let mut g = [0u8; 18];
        r.read_exact(&mut g)?;
        if be64(&g) != NBDMAGIC || be64(&g[8..]) != IHAVEOPT {
            return Err(proto("not an NBD newstyle server"));
        }
        w.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        let name = export.as_bytes();
        opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes());
        w.write_all(&opt)?;
        let mut info = None;
        loop {
            let mut h = [0u8; 20];
            r.read_exact(&mut h)?;
            if be64(&h) != OPTION_REPLY_MAGIC {
                return Err(proto("bad option reply magic"));
            }
            let (typ, len) = (be32(&h[12..]), be32(&h[16..]));
            if len > 1 << 20 {
                return Err(proto("option reply too long"));
            }
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data)?;
            if typ & (1 << 31) != 0 {
                let msg = String::from_utf8_lossy(&data).into_owned();
                return Err(io::Error::other(format!(
                    "export {export:?} refused (error {:#x}): {msg}",
                    typ
                )));
            }
            match typ {
                REP_INFO if data.len() >= 12 && be16(&data) == INFO_EXPORT => {
                    info = Some((be64(&data[2..]), be16(&data[10..])));
                }
                REP_ACK => break,
                _ => {}
            }
        }
        let (size, flags) = info.ok_or_else(|| proto("no NBD_INFO_EXPORT before the ack"))?;
        s.set_read_timeout(None)?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 20, r);
            loop {
                let reply = read_reply(&mut r);
                let end = reply.is_err();
                if tx.send(reply).is_err() || end {
                    return;
                }
            }
        });
        Ok(Client {
            out: BufWriter::with_capacity(1 << 20, w),
            replies: rx,
            size,
            flags,
            next: 0,
        })
    }

    /// Sends one request; returns its cookie. `data` is a write's payload.
    pub fn send(
        &mut self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        self.next = self.next.wrapping_add(1);
        let read_len = if cmd == Command::Read { len } else { 0 };
        let cookie = (u64::from(read_len) << 32) | u64::from(self.next);
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&u16::from(cmd).to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(data)?;
        self.out.flush()?;
        Ok(cookie)
    }

    /// The next reply, waiting at most `wait` (`Ok(None)`: none yet).
    pub fn recv(&mut self, wait: Duration) -> io::Result<Option<Reply>> {
        match self.replies.recv_timeout(wait) {
            Ok(r) => r.map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(io::ErrorKind::ConnectionAborted.into()),
        }
    }

    /// Sends `NBD_CMD_DISC` (best effort) and closes.
    pub fn disconnect(mut self) {
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&2u16.to_be_bytes());
        let _ = self.out.write_all(&h);
        let _ = self.out.flush();
        let _ = self.out.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.out.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

fn read_reply(r: &mut impl Read) -> io::Result<Reply> {
    let mut h = [0u8; 16];
    r.read_exact(&mut h)?;
    if be32(&h) != SIMPLE_REPLY_MAGIC {
        return Err(proto(format!("bad reply magic {:#x}", be32(&h))));
    }
    let error = be32(&h[4..]);
    let cookie = be64(&h[8..]);
    let len = (cookie >> 32) as usize;
    let mut data = Vec::new();
    if error == 0 && len > 0 {
        data.resize(len, 0);
        r.read_exact(&mut data)?;
    }
    Ok(Reply {
        cookie,
        error,
        data,
    })
}
