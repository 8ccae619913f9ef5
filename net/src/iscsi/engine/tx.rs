//! The output: PDUs queued in order, each its header (with its digest),
//! its data (bytes the engine built, or read data in the bio's pages) and
//! its tail (padding and data digest), handed out as pieces for a
//! vectored send.

use crate::iscsi::pdu::{self, BHS_LEN};
use crate::session::{PageSlice, TxPiece, TxPieces};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use crypt::crc32c::Crc32c;
use geom::page::{DataCounters, SgList};

/// A PDU's data segment.
enum Data {
    Bytes(Vec<u8>),
    Pages(SgList),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::Bytes(b) => b.len(),
            Data::Pages(sg) => sg.len_bytes() as usize,
        }
    }
}

/// One PDU to send.
struct Item {
    head: Vec<u8>,
    data: Data,
    tail: Vec<u8>,
    /// Bytes of it already sent.
    sent: usize,
}

impl Item {
    fn len(&self) -> usize {
        self.head.len() + self.data.len() + self.tail.len()
    }
}

/// PDUs waiting to be sent.
pub(super) struct TxQueue {
    items: VecDeque<Item>,
    /// Bytes of read data held in pages.
    page_bytes: u64,
}

/// The header with its digest, if any.
fn head(h: [u8; BHS_LEN], hd: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(BHS_LEN + 4);
    v.extend_from_slice(&h);
    if hd {
        let mut c = Crc32c::new();
        c.update(&h);
        v.extend_from_slice(&c.finish().to_le_bytes());
    }
    v
}

/// Padding, then the data digest of `crc` (already over the data).
fn tail(len: usize, crc: Option<Crc32c>) -> Vec<u8> {
    let mut v = Vec::new();
    if len == 0 {
        return v;
    }
    let p = pdu::pad(len);
    v.resize(p, 0);
    if let Some(mut c) = crc {
        c.update(&v);
        v.extend_from_slice(&c.finish().to_le_bytes());
    }
    v
}

impl TxQueue {
    /// Nothing to send.
    pub fn new() -> TxQueue {
        TxQueue {
            items: VecDeque::new(),
            page_bytes: 0,
        }
    }

    /// Queues a PDU whose data the engine built.
    pub fn push_bytes(&mut self, h: [u8; BHS_LEN], data: Vec<u8>, hd: bool, dd: bool) {
        let crc = dd.then(|| {
            let mut c = Crc32c::new();
            c.update(&data);
            c
        });
        let t = tail(data.len(), crc);
        self.items.push_back(Item {
            head: head(h, hd),
            data: Data::Bytes(data),
            tail: t,
            sent: 0,
        });
    }

    /// Queues a PDU whose data is read data in pages (mapped only for a
    /// data digest).
    pub fn push_pages(
        &mut self,
        h: [u8; BHS_LEN],
        sg: SgList,
        hd: bool,
        dd: bool,
        counters: &DataCounters,
    ) {
        let len = sg.len_bytes() as usize;
        let crc = dd.then(|| {
            let mut c = Crc32c::new();
            let _ = sg.map(counters, |_, b| c.update(b));
            c
        });
        let t = tail(len, crc);
        self.page_bytes += len as u64;
        self.items.push_back(Item {
            head: head(h, hd),
            data: Data::Pages(sg),
            tail: t,
            sent: 0,
        });
    }

    /// True with nothing queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes of read data queued in pages.
    pub fn page_bytes(&self) -> u64 {
        self.page_bytes
    }

    /// Drops everything queued.
    pub fn clear(&mut self) {
        self.items.clear();
        self.page_bytes = 0;
    }

    /// The output as pieces, about `max_bytes` of it.
    pub fn pieces<'a>(&'a self, out: &mut TxPieces<'a>, max_bytes: usize) {
        let mut bytes = 0usize;
        for it in &self.items {
            let mut skip = it.sent;
            let mut push = |out: &mut TxPieces<'a>, p: TxPiece<'a>| -> bool {
                if out.is_full() || bytes >= max_bytes {
                    return false;
                }
                bytes += p.len();
                out.push(p);
                true
            };
            // Header.
            if skip < it.head.len() {
                if !push(out, TxPiece::Bytes(&it.head[skip..])) {
                    return;
                }
                skip = 0;
            } else {
                skip -= it.head.len();
            }
            // Data.
            let dl = it.data.len();
            if skip < dl {
                match &it.data {
                    Data::Bytes(b) => {
                        if !push(out, TxPiece::Bytes(&b[skip..])) {
                            return;
                        }
                    }
                    Data::Pages(sg) => {
                        let mut s = skip;
                        for r in sg.iter() {
                            let l = r.len as usize;
                            if s >= l {
                                s -= l;
                                continue;
                            }
                            let p = PageSlice {
                                page: &r.page,
                                offset: r.offset as usize + s,
                                len: l - s,
                            };
                            s = 0;
                            if !push(out, TxPiece::Page(p)) {
                                return;
                            }
                        }
                    }
                }
                skip = 0;
            } else {
                skip -= dl;
            }
            // Tail.
            if skip < it.tail.len() && !push(out, TxPiece::Bytes(&it.tail[skip..])) {
                return;
            }
        }
    }

    /// `n` bytes were sent.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(it) = self.items.front_mut() else {
                break;
            };
            let left = it.len() - it.sent;
            let k = left.min(n);
            it.sent += k;
            n -= k;
            if it.sent == it.len() {
                if let Some(Item {
                    data: Data::Pages(sg),
                    ..
                }) = self.items.pop_front()
                {
                    self.page_bytes -= sg.len_bytes().min(self.page_bytes);
                }
            }
        }
    }
}
