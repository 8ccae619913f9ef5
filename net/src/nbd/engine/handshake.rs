//! Option haggling (proto.md "Option haggling"): the client flags, each
//! option and its replies, meta contexts, and the export chosen for
//! transmission with what it advertises.

use super::{Close, Connection, Rx};
use crate::nbd::wire::{
    self, ExportNameReplyRepr, OptionReplyRepr, OptionReplyView, OptionRepr, OptionView,
};
use crate::session::ExportInfo;
use alloc::vec::Vec;
use core::mem;

/// Longest option data the server buffers (`NBD_OPT_EXPORT_NAME`,
/// `NBD_OPT_INFO`, `NBD_OPT_GO`). A longer one of these options is taken
/// as a denial of service and the connection is closed (proto.md
/// "Termination of the session during option haggling"); the data of any
/// other option is skipped without being stored, whatever its length.
pub const OPTION_DATA_MAX: u32 = 64 * 1024;

/// Longest string the server sends (proto.md "Conventions": strings MUST be
/// no longer than 4096 bytes); longer names and descriptions are cut.
pub const STRING_MAX: usize = 4096;

/// The id given to `base:allocation` by `NBD_OPT_SET_META_CONTEXT` (any
/// value will do; the client treats it as opaque).
pub const ALLOCATION_CONTEXT_ID: u32 = 1;

/// Block size constraints as advertised in `NBD_INFO_BLOCK_SIZE` and
/// enforced on requests (proto.md "Size constraints").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLimits {
    /// Minimum block size (alignment of offsets and lengths).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum payload of a read or write.
    pub max_payload: u32,
}

impl ExportInfo {
    /// The transmission flags advertised for this export (proto.md
    /// "Transmission flags") to a client that did (`structured`) or did not
    /// negotiate structured replies.
    ///
    /// - `NBD_FLAG_CAN_MULTI_CONN` always: every connection submits to the
    ///   same stack from one event loop, so a FLUSH or FUA completes after
    ///   every write that completed before it, whichever connection sent it.
    /// - `NBD_FLAG_SEND_CACHE` always: CACHE is accepted and answered at
    ///   once (the stack keeps no cache to warm).
    /// - `NBD_FLAG_SEND_DF` only with structured replies (the spec forbids
    ///   it otherwise); every read is one data chunk anyway.
    /// - A read-only export offers no FLUSH, FUA, TRIM or WRITE_ZEROES (its
    ///   consumer is opened without write access, which the stack requires
    ///   for a flush).
    /// - `NBD_FLAG_SEND_FAST_ZERO` when the export both trims and zeroes:
    ///   the provider can then deallocate instead of writing zeroes.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = wire::TFLAG_HAS_FLAGS | wire::TFLAG_CAN_MULTI_CONN | wire::TFLAG_SEND_CACHE;
        if structured {
            f |= wire::TFLAG_SEND_DF;
        }
        if self.read_only {
            return f | wire::TFLAG_READ_ONLY;
        }
        if self.can_flush {
            f |= wire::TFLAG_SEND_FLUSH | wire::TFLAG_SEND_FUA;
        }
        if self.can_trim {
            f |= wire::TFLAG_SEND_TRIM;
        }
        if self.can_write_zeroes {
            f |= wire::TFLAG_SEND_WRITE_ZEROES;
            if self.can_trim {
                f |= wire::TFLAG_SEND_FAST_ZERO;
            }
        }
        f
    }

    /// The block size constraints for this export under a connection
    /// payload limit of `max_payload`, made valid per proto.md "Size
    /// constraints" (powers of two, preferred ≥ minimum and ≥ 512, maximum ≥
    /// preferred and a multiple of the minimum).
    pub fn block_limits(&self, max_payload: u32) -> BlockLimits {
        let min = if self.min_block.is_power_of_two() && self.min_block <= 65536 {
            self.min_block
        } else {
            1
        };
        let floor = min.max(512);
        let preferred = if self.preferred_block.is_power_of_two() && self.preferred_block >= floor {
            self.preferred_block
        } else {
            floor.max(4096)
        };
        let max_block = if self.max_block == 0 {
            u32::MAX
        } else {
            self.max_block
        };
        let max = max_block.min(max_payload).max(preferred);
        BlockLimits {
            min_block: min,
            preferred_block: preferred,
            max_payload: max - max % min,
        }
    }
}

/// The export chosen for transmission, fixed when the handshake ends.
#[derive(Clone, Copy, Debug)]
pub(super) struct Selected {
    pub(super) index: usize,
    pub(super) size: u64,
    pub(super) limits: BlockLimits,
    pub(super) read_only: bool,
    pub(super) can_flush: bool,
    pub(super) can_trim: bool,
    pub(super) can_write_zeroes: bool,
    pub(super) can_fast_zero: bool,
    /// `base:allocation` was selected for this export (block status works).
    pub(super) allocation: bool,
}

impl Connection {
    /// proto.md "Client flags": unknown flags close the connection.
    pub(super) fn on_client_flags(&mut self) {
        let flags = u32::from_be_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]]);
        self.hdr_len = 0;
        if flags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
            self.hard_close();
            return;
        }
        self.no_zeroes = flags & wire::FLAG_C_NO_ZEROES != 0;
        self.rx = Rx::OptHeader;
    }

    pub(super) fn on_option_header(&mut self, exports: &[ExportInfo]) {
        let parsed = OptionRepr::parse(&OptionView::new_unchecked(
            &self.hdr[..OptionView::<&[u8]>::LEN],
        ));
        self.hdr_len = 0;
        let Ok(o) = parsed else {
            self.hard_close();
            return;
        };
        self.rx = Rx::OptHeader;
        if o.option == wire::OPT_SET_META_CONTEXT {
            // Replaces the earlier selection, even if it fails.
            self.meta = None;
        }
        let buffered = matches!(
            o.option,
            wire::OPT_EXPORT_NAME
                | wire::OPT_INFO
                | wire::OPT_GO
                | wire::OPT_LIST_META_CONTEXT
                | wire::OPT_SET_META_CONTEXT
        );
        if o.option == wire::OPT_EXPORT_NAME && (self.shutting_down || o.length > OPTION_DATA_MAX) {
            // NBD_OPT_EXPORT_NAME has no error reply: the session ends.
            self.hard_close();
            return;
        }
        if self.shutting_down && o.option != wire::OPT_ABORT {
            self.skip_option(o.option, o.length, wire::REP_ERR_SHUTDOWN);
            return;
        }
        if buffered && o.length > OPTION_DATA_MAX {
            // Skipped unread: an option this long is refused, not buffered.
            self.skip_option(o.option, o.length, wire::REP_ERR_TOO_BIG);
            return;
        }
        match o.option {
            _ if buffered => {
                self.opt_buf.clear();
                if o.length == 0 {
                    self.finish_option(exports, o.option);
                } else {
                    self.rx = Rx::OptData {
                        option: o.option,
                        len: o.length as usize,
                    };
                }
            }
            // proto.md NBD_OPT_ABORT: the server SHOULD ignore any data.
            wire::OPT_ABORT => self.skip_option(o.option, o.length, wire::REP_ACK),
            wire::OPT_LIST | wire::OPT_STRUCTURED_REPLY if o.length == 0 => {
                self.finish_option(exports, o.option)
            }
            // "The client MUST NOT send any additional data with the option".
            wire::OPT_LIST | wire::OPT_STRUCTURED_REPLY => {
                self.skip_option(o.option, o.length, wire::REP_ERR_INVALID)
            }
            // Unknown options, and STARTTLS (NOTLS mode).
            _ => self.skip_option(o.option, o.length, wire::REP_ERR_UNSUP),
        }
    }

    fn skip_option(&mut self, option: u32, len: u32, reply: u32) {
        if len == 0 {
            self.end_skipped_option(option, reply);
        } else {
            self.rx = Rx::OptSkip {
                option,
                left: len,
                reply,
            };
        }
    }

    pub(super) fn end_skipped_option(&mut self, option: u32, reply: u32) {
        self.option_reply(option, reply, &[]);
        if option == wire::OPT_ABORT {
            self.rx = Rx::Done;
            self.closing = Some(Close::Soft);
        } else {
            self.rx = Rx::OptHeader;
        }
    }

    pub(super) fn finish_option(&mut self, exports: &[ExportInfo], option: u32) {
        let data = mem::take(&mut self.opt_buf);
        self.rx = Rx::OptHeader;
        match option {
            wire::OPT_EXPORT_NAME => self.opt_export_name(exports, &data),
            wire::OPT_INFO | wire::OPT_GO => self.opt_info_go(exports, option, &data),
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                self.opt_meta_context(exports, option, &data)
            }
            wire::OPT_LIST => {
                for e in exports {
                    let name = clamp_str(&e.name);
                    let desc = clamp_str(&e.description);
                    let len = (name.len() as u32).to_be_bytes();
                    self.option_reply(option, wire::REP_SERVER, &[&len, name, desc]);
                }
                self.option_reply(option, wire::REP_ACK, &[]);
            }
            wire::OPT_STRUCTURED_REPLY => {
                self.structured = true;
                self.option_reply(option, wire::REP_ACK, &[]);
            }
            _ => self.option_reply(option, wire::REP_ERR_UNSUP, &[]),
        }
        if self.selected.is_none() && self.closing.is_none() {
            // Keep the allocation for the next option.
            self.opt_buf = data;
            self.opt_buf.clear();
        }
    }

    /// proto.md NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT, for
    /// the one context served, `base:allocation`. Both need structured
    /// replies first (`NBD_REP_ERR_INVALID` otherwise). LIST answers an
    /// empty query list, `base:` and `base:allocation`; SET selects
    /// `base:allocation` when asked for by name. Queries in other
    /// namespaces are ignored, as the spec requires.
    fn opt_meta_context(&mut self, exports: &[ExportInfo], option: u32, data: &[u8]) {
        let set = option == wire::OPT_SET_META_CONTEXT;
        if !self.structured {
            self.option_reply(option, wire::REP_ERR_INVALID, &[]);
            return;
        }
        let Some(q) = parse_meta_request(data) else {
            self.option_reply(option, wire::REP_ERR_INVALID, &[]);
            return;
        };
        let Some(i) = find_export(exports, q.name) else {
            self.option_reply(option, wire::REP_ERR_UNKNOWN, &[]);
            return;
        };
        let found = if set {
            q.allocation
        } else {
            q.count == 0 || q.allocation || q.base_wildcard
        };
        if found {
            // The id is reserved (zero) in LIST replies.
            let id: u32 = if set { ALLOCATION_CONTEXT_ID } else { 0 };
            self.option_reply(
                option,
                wire::REP_META_CONTEXT,
                &[&id.to_be_bytes(), wire::BASE_ALLOCATION.as_bytes()],
            );
            if set {
                self.meta = Some(i);
            }
        }
        self.option_reply(option, wire::REP_ACK, &[]);
    }

    /// proto.md NBD_OPT_EXPORT_NAME: an unknown export MUST end the session.
    fn opt_export_name(&mut self, exports: &[ExportInfo], name: &[u8]) {
        let Some(i) = find_export(exports, name) else {
            self.hard_close();
            return;
        };
        let sel = self.select(exports, i);
        let r = ExportNameReplyRepr {
            size: sel.size,
            flags: exports[i].transmission_flags(self.structured),
            zeroes: !self.no_zeroes,
        };
        let at = self.ctl_grow(r.buffer_len());
        r.emit(&mut self.ctl[at..]);
        self.rx = Rx::ReqHeader;
    }

    /// proto.md NBD_OPT_INFO / NBD_OPT_GO.
    fn opt_info_go(&mut self, exports: &[ExportInfo], option: u32, data: &[u8]) {
        let Some(req) = parse_info_request(data) else {
            self.option_reply(option, wire::REP_ERR_INVALID, &[]);
            return;
        };
        let Some(i) = find_export(exports, req.name) else {
            self.option_reply(option, wire::REP_ERR_UNKNOWN, &[]);
            return;
        };
        let e = &exports[i];
        let limits = e.block_limits(self.cfg.max_payload);

        let mut export = [0u8; 12];
        export[0..2].copy_from_slice(&wire::INFO_EXPORT.to_be_bytes());
        export[2..10].copy_from_slice(&e.size_bytes.to_be_bytes());
        export[10..12].copy_from_slice(&e.transmission_flags(self.structured).to_be_bytes());
        self.option_reply(option, wire::REP_INFO, &[&export]);
        if req.name_wanted {
            let name = clamp_str(&e.name);
            self.option_reply(
                option,
                wire::REP_INFO,
                &[&wire::INFO_NAME.to_be_bytes(), name],
            );
        }
        if req.description_wanted {
            let desc = clamp_str(&e.description);
            self.option_reply(
                option,
                wire::REP_INFO,
                &[&wire::INFO_DESCRIPTION.to_be_bytes(), desc],
            );
        }
        // Sent whether asked for or not: the server enforces these limits
        // (proto.md "Size constraints"; unrequested info is allowed).
        let mut bs = [0u8; 14];
        bs[0..2].copy_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
        bs[2..6].copy_from_slice(&limits.min_block.to_be_bytes());
        bs[6..10].copy_from_slice(&limits.preferred_block.to_be_bytes());
        bs[10..14].copy_from_slice(&limits.max_payload.to_be_bytes());
        self.option_reply(option, wire::REP_INFO, &[&bs]);
        self.option_reply(option, wire::REP_ACK, &[]);
        if option == wire::OPT_GO {
            self.select(exports, i);
            self.rx = Rx::ReqHeader;
        }
    }

    fn select(&mut self, exports: &[ExportInfo], i: usize) -> Selected {
        let e = &exports[i];
        let sel = Selected {
            index: i,
            size: e.size_bytes,
            limits: e.block_limits(self.cfg.max_payload),
            read_only: e.read_only,
            can_flush: e.can_flush && !e.read_only,
            can_trim: e.can_trim && !e.read_only,
            can_write_zeroes: e.can_write_zeroes && !e.read_only,
            can_fast_zero: e.can_write_zeroes && e.can_trim && !e.read_only,
            allocation: self.structured && self.meta == Some(i),
        };
        self.selected = Some(sel);
        self.opt_buf = Vec::new();
        sel
    }

    /// Queues an option reply whose data is the concatenation of `parts`.
    fn option_reply(&mut self, option: u32, reply_type: u32, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let h = OptionReplyRepr {
            option,
            reply_type,
            length: u32::try_from(len).unwrap_or(u32::MAX),
        };
        let at = self.ctl_grow(h.buffer_len());
        h.emit(&mut OptionReplyView::new_unchecked(&mut self.ctl[at..]));
        for p in parts {
            self.ctl.extend_from_slice(p);
        }
    }
}

// ---- option helpers ----

/// An export by name; the empty name selects the default export, index 0
/// (proto.md NBD_OPT_EXPORT_NAME).
fn find_export(exports: &[ExportInfo], name: &[u8]) -> Option<usize> {
    exports
        .iter()
        .position(|e| e.name.as_bytes() == name)
        .or_else(|| (name.is_empty() && !exports.is_empty()).then_some(0))
}

/// A string cut to [`STRING_MAX`] bytes on a character boundary.
fn clamp_str(s: &str) -> &[u8] {
    let mut n = s.len().min(STRING_MAX);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s.as_bytes()[..n]
}

/// What the data of a meta context option asks for.
struct MetaRequest<'a> {
    name: &'a [u8],
    /// Number of queries.
    count: u32,
    /// `base:allocation` was asked for.
    allocation: bool,
    /// `base:` (every context in the namespace) was asked for.
    base_wildcard: bool,
}

/// proto.md NBD_OPT_LIST_META_CONTEXT: u32 name length, name, u32 query
/// count, then each query as u32 length and string. None if malformed (a
/// length past the data, a string over [`STRING_MAX`], data left over).
fn parse_meta_request(data: &[u8]) -> Option<MetaRequest<'_>> {
    fn take_str(data: &[u8]) -> Option<(&[u8], &[u8])> {
        let len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        if len > STRING_MAX {
            return None;
        }
        let s = data.get(4..4usize.checked_add(len)?)?;
        Some((s, &data[4 + len..]))
    }
    let (name, rest) = take_str(data)?;
    let count = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?);
    let mut rest = &rest[4..];
    let mut req = MetaRequest {
        name,
        count,
        allocation: false,
        base_wildcard: false,
    };
    for _ in 0..count {
        let (q, r) = take_str(rest)?;
        req.allocation |= q == wire::BASE_ALLOCATION.as_bytes();
        req.base_wildcard |= q == b"base:";
        rest = r;
    }
    rest.is_empty().then_some(req)
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
struct InfoRequest<'a> {
    name: &'a [u8],
    name_wanted: bool,
    description_wanted: bool,
}

/// proto.md NBD_OPT_INFO: u32 name length (≤ data length − 6), name,
/// u16 count, count × u16 information requests. None if malformed.
fn parse_info_request(data: &[u8]) -> Option<InfoRequest<'_>> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    if name_len > data.len().checked_sub(6)? || name_len > STRING_MAX {
        return None;
    }
    let name = data.get(4..4 + name_len)?;
    let rest = data.get(4 + name_len..)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let mut req = InfoRequest {
        name,
        name_wanted: false,
        description_wanted: false,
    };
    for item in list.chunks_exact(2) {
        match u16::from_be_bytes([item[0], item[1]]) {
            wire::INFO_NAME => req.name_wanted = true,
            wire::INFO_DESCRIPTION => req.description_wanted = true,
            // INFO_EXPORT and INFO_BLOCK_SIZE are always sent; others ignored.
            _ => {}
        }
    }
    Some(req)
}
