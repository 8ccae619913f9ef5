//! Output: the control bytes (greeting, option replies), the headers of
//! request replies, and the pieces handed out for a vectored send.

use super::handshake::ALLOCATION_CONTEXT_ID;
use super::slots::{Slot, SlotState};
use super::{Close, Connection};
use crate::nbd::wire::{self, ChunkRepr, ChunkView, Command, SimpleReplyRepr, SimpleReplyView};
use crate::session::{PageSlice, TxPiece};
use arrayvec::ArrayVec;

/// Longest error message carried in an `NBD_REPLY_TYPE_ERROR` chunk.
const MESSAGE_MAX: usize = 64;

/// Room for the longest reply header: chunk header, error fields, message.
const TX_HDR_MAX: usize = wire::ChunkView::<&[u8]>::LEN + 6 + MESSAGE_MAX;

/// The reply being sent: its header bytes, then its read data or block
/// status descriptors.
#[derive(Debug)]
pub(super) struct TxCur {
    slot: u32,
    hdr: [u8; TX_HDR_MAX],
    hdr_len: usize,
    hdr_pos: usize,
    data_len: u64,
    data_pos: u64,
}

impl Connection {
    /// The output waiting to be sent, as pieces for a vectored send
    /// (`writev`), without taking it: as many pieces as `out` holds and
    /// about `max_bytes` bytes, in order. Send any prefix of them, then
    /// call [`Connection::tx_advance`] with the number of bytes sent. Read
    /// data is handed out as the bio's own pages, so it is never copied
    /// here.
    pub fn tx_pieces<'a, const N: usize>(
        &'a mut self,
        out: &mut ArrayVec<TxPiece<'a>, N>,
        max_bytes: usize,
    ) {
        if self.closing == Some(Close::Hard) || out.is_full() || max_bytes == 0 {
            return;
        }
        // Headers of the next few replies, so several go out in one call.
        self.prepare_tx(out.remaining_capacity().min(64));
        let this: &'a Connection = self;
        let mut bytes = 0;
        let mut push = |out: &mut ArrayVec<TxPiece<'a>, N>, p: TxPiece<'a>| {
            bytes += p.len();
            out.push(p);
            !out.is_full() && bytes < max_bytes
        };
        if this.ctl_pos < this.ctl.len() && !push(out, TxPiece::Bytes(&this.ctl[this.ctl_pos..])) {
            return;
        }
        for cur in &this.sending {
            if cur.hdr_pos < cur.hdr_len
                && !push(out, TxPiece::Bytes(&cur.hdr[cur.hdr_pos..cur.hdr_len]))
            {
                return;
            }
            if cur.data_pos == cur.data_len {
                continue;
            }
            let Some(Slot {
                state: SlotState::Reply(rep),
                ..
            }) = this.slots.get(cur.slot as usize)
            else {
                continue;
            };
            match &rep.bio {
                Some(bio) => {
                    let mut skip = cur.data_pos;
                    for r in bio.sg.iter() {
                        let len = u64::from(r.len);
                        if skip >= len {
                            skip -= len;
                            continue;
                        }
                        let piece = TxPiece::Page(PageSlice {
                            page: &r.page,
                            offset: r.offset as usize + skip as usize,
                            len: (len - skip) as usize,
                        });
                        skip = 0;
                        if !push(out, piece) {
                            return;
                        }
                    }
                }
                None => {
                    let at = cur.data_pos as usize;
                    if let Some(src) = rep.extents.get(at..) {
                        if !push(out, TxPiece::Bytes(src)) {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Records that the first `n` bytes of the output described by
    /// [`Connection::tx_pieces`] were sent.
    pub fn tx_advance(&mut self, mut n: usize) {
        if self.closing == Some(Close::Hard) {
            return;
        }
        self.active |= n > 0;
        let k = n.min(self.ctl_pending());
        self.advance_ctl(k);
        n -= k;
        while n > 0 {
            if self.sending.is_empty() && !self.prepare_tx(1) {
                break;
            }
            let Some(cur) = self.sending.front_mut() else {
                break;
            };
            let h = (cur.hdr_len - cur.hdr_pos).min(n);
            cur.hdr_pos += h;
            n -= h;
            let d = (cur.data_len - cur.data_pos).min(n as u64);
            cur.data_pos += d;
            n -= d as usize;
            if cur.hdr_pos == cur.hdr_len && cur.data_pos == cur.data_len {
                let slot = cur.slot;
                self.sending.pop_front();
                self.free_slot(slot as usize);
            }
        }
    }

    pub(super) fn ctl_pending(&self) -> usize {
        self.ctl.len() - self.ctl_pos
    }

    /// Marks `k` control bytes as sent.
    fn advance_ctl(&mut self, k: usize) {
        self.ctl_pos += k;
        if self.ctl_pos >= self.ctl.len() {
            self.ctl.clear();
            self.ctl_pos = 0;
        }
    }

    /// Grows the control buffer by `n` zero bytes; returns where they start.
    pub(super) fn ctl_grow(&mut self, n: usize) -> usize {
        let at = self.ctl.len();
        self.ctl.resize(at + n, 0);
        at
    }

    /// Builds the headers of up to `want` queued replies; false if none is
    /// being sent.
    fn prepare_tx(&mut self, want: usize) -> bool {
        while self.sending.len() < want {
            let Some(idx) = self.replies.pop_front() else {
                break;
            };
            if let Some(c) = self.start_reply(idx) {
                self.sending.push_back(c);
            }
        }
        !self.sending.is_empty()
    }

    /// Builds the header of the reply in slot `idx`.
    fn start_reply(&self, idx: u32) -> Option<TxCur> {
        let slot = self.slots.get(idx as usize)?;
        let SlotState::Reply(rep) = &slot.state else {
            return None;
        };
        let mut cur = TxCur {
            slot: idx,
            hdr: [0; TX_HDR_MAX],
            hdr_len: 0,
            hdr_pos: 0,
            data_len: 0,
            data_pos: 0,
        };
        let chunk_len = ChunkView::<&[u8]>::LEN;
        if rep.error != 0 && self.structured {
            // proto.md NBD_REPLY_TYPE_ERROR: u32 error, u16 message length,
            // message; the only chunk, so it carries NBD_REPLY_FLAG_DONE.
            let msg = &rep.message.as_bytes()[..rep.message.len().min(MESSAGE_MAX)];
            ChunkRepr {
                flags: wire::REPLY_FLAG_DONE,
                chunk_type: wire::REPLY_TYPE_ERROR,
                cookie: slot.cookie,
                length: 6 + msg.len() as u32,
            }
            .emit(&mut ChunkView::new_unchecked(&mut cur.hdr[..]));
            cur.hdr[chunk_len..chunk_len + 4].copy_from_slice(&rep.error.to_be_bytes());
            cur.hdr[chunk_len + 4..chunk_len + 6]
                .copy_from_slice(&(msg.len() as u16).to_be_bytes());
            cur.hdr[chunk_len + 6..chunk_len + 6 + msg.len()].copy_from_slice(msg);
            cur.hdr_len = chunk_len + 6 + msg.len();
        } else if rep.error == 0 && slot.command == Command::BlockStatus {
            // proto.md NBD_REPLY_TYPE_BLOCK_STATUS: u32 context id, then the
            // descriptors; one chunk, as one context is ever selected.
            ChunkRepr {
                flags: wire::REPLY_FLAG_DONE,
                chunk_type: wire::REPLY_TYPE_BLOCK_STATUS,
                cookie: slot.cookie,
                length: 4 + rep.extents.len() as u32,
            }
            .emit(&mut ChunkView::new_unchecked(&mut cur.hdr[..]));
            cur.hdr[chunk_len..chunk_len + 4].copy_from_slice(&ALLOCATION_CONTEXT_ID.to_be_bytes());
            cur.hdr_len = chunk_len + 4;
            cur.data_len = rep.extents.len() as u64;
        } else if rep.error == 0 && slot.command == Command::Read && self.structured {
            if slot.length == 0 {
                ChunkRepr {
                    flags: wire::REPLY_FLAG_DONE,
                    chunk_type: wire::REPLY_TYPE_NONE,
                    cookie: slot.cookie,
                    length: 0,
                }
                .emit(&mut ChunkView::new_unchecked(&mut cur.hdr[..]));
                cur.hdr_len = chunk_len;
            } else {
                // One data chunk, final: the data is already read, so no error
                // can come up while it is sent (proto.md "Structured replies").
                ChunkRepr {
                    flags: wire::REPLY_FLAG_DONE,
                    chunk_type: wire::REPLY_TYPE_OFFSET_DATA,
                    cookie: slot.cookie,
                    length: slot.length.saturating_add(8),
                }
                .emit(&mut ChunkView::new_unchecked(&mut cur.hdr[..]));
                cur.hdr[chunk_len..chunk_len + 8].copy_from_slice(&slot.offset.to_be_bytes());
                cur.hdr_len = chunk_len + 8;
                cur.data_len = u64::from(slot.length);
            }
        } else {
            SimpleReplyRepr {
                error: rep.error,
                cookie: slot.cookie,
            }
            .emit(&mut SimpleReplyView::new_unchecked(&mut cur.hdr[..]));
            cur.hdr_len = SimpleReplyView::<&[u8]>::LEN;
            if rep.error == 0 && slot.command == Command::Read {
                cur.data_len = u64::from(slot.length);
            }
        }
        Some(cur)
    }
}
