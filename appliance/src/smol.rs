//! smoltcp's TCP sockets as the link's transport: the unikernel's
//! connections, and the host-side benchmark that runs the same code.
//!
//! smoltcp keeps each socket's data in its own rings, so this transport
//! copies: received bytes from the ring straight into the pieces (a
//! write's payload into its pages, through the counted map step) and the
//! rest into the link's buffer; output from the pieces (read data out of
//! its pages) straight into the send ring. smoltcp itself copies every
//! byte once more, between its rings and the Ethernet frames; both copies
//! are counted.

#![forbid(unsafe_code)]

use crate::service::{Recv, Sent, Transport};
use alloc::vec;
use geom::page::DataCounters;
use net::session::{PageSlice, TxPiece};
use smoltcp::socket::tcp;

/// A TCP socket with `bytes` of buffer per direction, set up for storage
/// traffic.
pub fn tcp_socket(bytes: usize) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; bytes]),
        tcp::SocketBuffer::new(vec![0u8; bytes]),
    );
    // Delayed ACKs with few segments in flight stall the sender, and Nagle
    // would hold small replies back behind unacknowledged data.
    s.set_ack_delay(None);
    s.set_nagle_enabled(false);
    s
}

/// A smoltcp socket as the link's transport.
pub struct Smol<'s, 'b>(pub &'s mut tcp::Socket<'b>);

impl Transport for Smol<'_, '_> {
    fn recv(&mut self, pieces: &[PageSlice<'_>], buf: &mut [u8], counters: &DataCounters) -> Recv {
        let sock = &mut *self.0;
        if !sock.can_recv() {
            return if !sock.may_recv() {
                Recv::Closed
            } else if !sock.is_open() {
                Recv::Broken
            } else {
                Recv::WouldBlock
            };
        }
        let (mut piece, mut within, mut in_buf, mut total) = (0, 0, 0, 0);
        let mut stuck = false;
        // The ring wraps: each call takes one contiguous part of it.
        while sock.can_recv() && !stuck && (piece < pieces.len() || in_buf < buf.len()) {
            let took = sock
                .recv(|data| {
                    let mut used = 0;
                    while used < data.len() {
                        if let Some(p) = pieces.get(piece) {
                            let k = (p.len - within).min(data.len() - used);
                            let src = &data[used..used + k];
                            if p.page.copy_in(p.offset + within, src, counters).is_err() {
                                stuck = true;
                                break;
                            }
                            used += k;
                            within += k;
                            if within == p.len {
                                piece += 1;
                                within = 0;
                            }
                        } else {
                            let k = (buf.len() - in_buf).min(data.len() - used);
                            if k == 0 {
                                break;
                            }
                            buf[in_buf..in_buf + k].copy_from_slice(&data[used..used + k]);
                            counters.add_copied(k);
                            in_buf += k;
                            used += k;
                        }
                    }
                    (used, used)
                })
                .unwrap_or(0);
            if took == 0 {
                break;
            }
            total += took;
        }
        if stuck && total == 0 {
            return Recv::Broken;
        }
        // smoltcp's own copy, from the frames into the ring.
        counters.add_copied(total);
        Recv::Got(total)
    }

    fn send(&mut self, pieces: &[TxPiece<'_>], counters: &DataCounters) -> Sent {
        let sock = &mut *self.0;
        if !sock.may_send() {
            return Sent::Broken;
        }
        let (mut piece, mut within, mut total) = (0, 0, 0);
        let mut stuck = false;
        while sock.can_send() && piece < pieces.len() && !stuck {
            let took = sock
                .send(|room| {
                    let mut used = 0;
                    while used < room.len() && piece < pieces.len() {
                        let p = &pieces[piece];
                        let k = (p.len() - within).min(room.len() - used);
                        let dst = &mut room[used..used + k];
                        match p {
                            TxPiece::Bytes(b) => {
                                dst.copy_from_slice(&b[within..within + k]);
                                counters.add_copied(k);
                            }
                            TxPiece::Page(s) => {
                                if s.page.copy_out(s.offset + within, dst, counters).is_err() {
                                    stuck = true;
                                    break;
                                }
                            }
                        }
                        used += k;
                        within += k;
                        if within == p.len() {
                            piece += 1;
                            within = 0;
                        }
                    }
                    (used, used)
                })
                .unwrap_or(0);
            if took == 0 {
                break;
            }
            total += took;
        }
        if stuck && total == 0 {
            return Sent::Broken;
        }
        // smoltcp's own copy, from the ring into the frames.
        counters.add_copied(total);
        Sent::Took(total)
    }
}
