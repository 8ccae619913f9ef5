//! The one receive path and the one send path of every connection, on
//! both platforms: a [`Link`] moves bytes between a platform's
//! [`Transport`] (a std socket with `readv`/`writev`, a smoltcp socket)
//! and the connection's session.
//!
//! ```text
//!  receive: session.rx_pieces ─▶ transport.recv(pieces, buffer) ─▶ rx_filled
//!                                                        └─▶ buffer ─▶ session.recv
//!  send:    session.tx_pieces ─▶ transport.send(pieces) ─▶ tx_advance
//! ```
//!
//! A write's payload lands straight in its bio's pages; only request
//! headers, and what arrives with them in the same read, pass through the
//! link's small receive buffer. Output leaves as the session's pieces:
//! headers as bytes, read data as the bios' pages. What a transport
//! copies it counts in the counters it is given, which the link adds to
//! the session's.

use super::{ConnId, Service};
use alloc::vec;
use alloc::vec::Vec;
use geom::page::DataCounters;
use net::session::{PageSlice, RxPieces, TxPiece, TxPieces};

/// Receive buffer per connection: request headers, and whatever arrives
/// with them.
const RX_BUF: usize = 64 << 10;

/// Most bytes read into the receive buffer at once: a batch of request
/// headers, or a few small writes. Kept small so that a large write's
/// payload mostly lands straight in its pages.
const RX_READ: usize = 16 << 10;

/// Most bytes offered to one send.
const TX_BYTES: usize = 8 << 20;

/// What a transport's receive did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recv {
    /// This many bytes arrived: first into the pieces, in order, then
    /// into the buffer.
    Got(usize),
    /// Nothing now; try again when the socket is readable.
    WouldBlock,
    /// The peer shut its side: nothing more will arrive.
    Closed,
    /// The connection failed.
    Broken,
}

/// What a transport's send did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// This many bytes of the pieces, in order, were taken.
    Took(usize),
    /// Nothing now; try again when the socket is writable.
    WouldBlock,
    /// The connection failed.
    Broken,
}

/// A platform's socket as the link drives it.
pub trait Transport {
    /// Receives into `pieces` (page ranges, in order) and then `buf`.
    /// Copies it makes (into pages, or inside a network stack) are counted
    /// in `counters`.
    fn recv(&mut self, pieces: &[PageSlice<'_>], buf: &mut [u8], counters: &DataCounters) -> Recv;

    /// Sends from `pieces`, in order; copies are counted in `counters`.
    fn send(&mut self, pieces: &[TxPiece<'_>], counters: &DataCounters) -> Sent;
}

/// One connection's receive buffer and state, between its transport and
/// its session.
pub struct Link {
    id: ConnId,
    /// Received bytes not yet taken by the session: `rx[rx_start..rx_end]`.
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// The peer shut its side.
    eof: bool,
    /// The transport failed.
    broken: bool,
    /// The last send took less than offered: wait for the socket.
    blocked: bool,
}

impl Link {
    /// The link of connection `id` (from [`Service::open`]).
    pub fn new(id: ConnId) -> Link {
        Link {
            id,
            rx: vec![0; RX_BUF],
            rx_start: 0,
            rx_end: 0,
            eof: false,
            broken: false,
            blocked: false,
        }
    }

    /// The connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Hands buffered input to the session; true if it took any.
    fn feed(&mut self, svc: &mut Service) -> bool {
        if self.rx_start == self.rx_end {
            return false;
        }
        let used = svc.feed(self.id, &self.rx[self.rx_start..self.rx_end]);
        self.rx_start += used;
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        used > 0
    }

    /// Receives and feeds until the transport has nothing more or the
    /// session stops taking input (backpressure: the rest stays in the
    /// socket); true on progress.
    pub fn receive(&mut self, svc: &mut Service, t: &mut dyn Transport) -> bool {
        let mut progress = self.feed(svc);
        while !self.eof && !self.broken && self.rx_start == self.rx_end {
            let Some(session) = svc.session(self.id) else {
                return progress;
            };
            if !session.wants_recv() && session.rx_pieces(&mut RxPieces::new()) == 0 {
                break;
            }
            let counters = DataCounters::new();
            let mut pieces = RxPieces::new();
            let room = session.rx_pieces(&mut pieces);
            let buffered = RX_READ.min(self.rx.len());
            let r = t.recv(&pieces, &mut self.rx[..buffered], &counters);
            drop(pieces);
            let Some(session) = svc.session_mut(self.id) else {
                return progress;
            };
            session.counters().add(&counters);
            match r {
                Recv::Got(0) | Recv::WouldBlock => break,
                Recv::Got(n) => {
                    progress = true;
                    let direct = n.min(room);
                    if direct > 0 {
                        session.rx_filled(direct);
                    }
                    self.rx_start = 0;
                    self.rx_end = n - direct;
                    self.feed(svc);
                }
                Recv::Closed => self.eof = true,
                Recv::Broken => self.broken = true,
            }
        }
        if self.eof && self.rx_start == self.rx_end {
            // Every byte the peer sent was fed: it still gets its replies.
            if let Some(s) = svc.session_mut(self.id) {
                s.input_closed();
            }
        }
        progress
    }

    /// Sends what the session has, unless the last send was cut short and
    /// the platform has not said the socket is writable again
    /// ([`Link::writable`]); true on progress.
    pub fn send(&mut self, svc: &mut Service, t: &mut dyn Transport) -> bool {
        let mut progress = false;
        while !self.broken && !self.blocked {
            let Some(session) = svc.session_mut(self.id) else {
                return progress;
            };
            let counters = DataCounters::new();
            let mut pieces = TxPieces::new();
            session.tx_pieces(&mut pieces, TX_BYTES);
            if pieces.is_empty() {
                break;
            }
            let offered: usize = pieces.iter().map(TxPiece::len).sum();
            let r = t.send(&pieces, &counters);
            drop(pieces);
            session.counters().add(&counters);
            match r {
                Sent::Took(n) => {
                    session.tx_advance(n);
                    progress |= n > 0;
                    self.blocked = n < offered;
                    if self.blocked {
                        break;
                    }
                }
                Sent::WouldBlock => {
                    self.blocked = true;
                    break;
                }
                Sent::Broken => self.broken = true,
            }
        }
        progress
    }

    /// True while the transport should report readability: the session
    /// takes input and nothing buffered waits.
    pub fn wants_input(&self) -> bool {
        !self.eof && !self.broken && self.rx_start == self.rx_end
    }

    /// True while the transport should report writability: output waits,
    /// or the last send was cut short.
    pub fn wants_output(&self, svc: &Service) -> bool {
        !self.broken && (self.blocked || svc.session(self.id).is_some_and(|s| s.has_tx()))
    }

    /// The socket may take more: a blocked send can go on.
    pub fn writable(&mut self) {
        self.blocked = false;
    }

    /// True once the connection is over: the session finished (its replies
    /// all handed to the transport), or the transport failed. The platform
    /// then closes the socket and calls [`Service::close`].
    pub fn finished(&self, svc: &Service) -> bool {
        self.broken || svc.session(self.id).is_none_or(|s| s.is_finished())
    }
}
