//! The transmission phase (proto.md "Transmission"): request headers and
//! their checks, the bios made from them, write payloads placed in pages,
//! and completed bios turned into replies.

use super::handshake::Selected;
use super::slots::{Reply, Slot, SlotState};
use super::{Close, Connection, Request, Rx};
use crate::nbd::wire::{self, Command, RequestRepr, RequestView};
use crate::session::PageSlice;
use alloc::vec::Vec;
use arrayvec::ArrayVec;
use core::mem;
use geom::bio::{Bio, BioCmd, BioError, BioResult, Extent};
use geom::page::SgList;

/// Most extents in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (proto.md says
/// no more than 2^20; fewer keeps a reply within 128 KiB).
pub const MAX_REPLY_EXTENTS: usize = 16384;

/// An error found before a bio was made.
#[derive(Clone, Copy, Debug)]
struct Fail {
    errno: u32,
    message: &'static str,
}

const fn fail(errno: u32, message: &'static str) -> Fail {
    Fail { errno, message }
}

impl Connection {
    // ---- request headers ----

    pub(super) fn on_request_header(&mut self) {
        let parsed = RequestRepr::parse(&RequestView::new_unchecked(&self.hdr[..]));
        self.hdr_len = 0;
        // proto.md: a violation of a mandatory condition MAY end the session;
        // after a bad magic the stream cannot be resynchronised.
        let (Ok(r), Some(sel)) = (parsed, self.selected) else {
            self.hard_close();
            return;
        };
        if self.shutting_down && r.command != Command::Disc {
            let f = fail(wire::ESHUTDOWN, "the server is shutting down");
            if r.command == Command::Write {
                self.refuse_write(&r, f);
            } else {
                self.queue_error(&r, f);
            }
            return;
        }
        let fua = wire::CMD_FLAG_FUA;
        match r.command {
            Command::Disc => {
                // No reply; finish once outstanding replies are sent.
                self.rx = Rx::Done;
                self.closing = Some(Close::Soft);
            }
            Command::Read => match self.check_read(&sel, &r) {
                Err(f) => self.queue_error(&r, f),
                Ok(()) => {
                    self.rx = Rx::Admit(r);
                    self.admit_self();
                }
            },
            Command::Write => self.start_write(&sel, &r),
            Command::Flush => match check_flags(&r, fua) {
                Err(f) => self.queue_error(&r, f),
                Ok(()) if !sel.can_flush => {
                    self.queue_error(&r, fail(wire::EINVAL, "flush is not supported"))
                }
                Ok(()) => self.queue_bio(&r, Bio::flush(), 0),
            },
            Command::Trim => {
                let checked = check_flags(&r, fua)
                    .and_then(|()| check_writable(&sel))
                    .and_then(|()| require(sel.can_trim, wire::EINVAL, "trim is not supported"))
                    .and_then(|()| check_range(&sel, &r, wire::EINVAL));
                self.queue_no_data(&r, checked, BioCmd::Discard);
            }
            Command::WriteZeroes => {
                let fast = if sel.can_fast_zero {
                    wire::CMD_FLAG_FAST_ZERO
                } else {
                    0
                };
                let checked = check_flags(&r, fua | wire::CMD_FLAG_NO_HOLE | fast)
                    .and_then(|()| check_writable(&sel))
                    .and_then(|()| {
                        require(
                            sel.can_write_zeroes,
                            wire::EINVAL,
                            "write zeroes is not supported",
                        )
                    })
                    .and_then(|()| check_range(&sel, &r, wire::ENOSPC))
                    .and_then(|()| {
                        // proto.md NBD_CMD_FLAG_FAST_ZERO: fail quickly with
                        // ENOTSUP unless it is faster than a write. Zeroing
                        // that must stay allocated may write every byte.
                        let both = wire::CMD_FLAG_FAST_ZERO | wire::CMD_FLAG_NO_HOLE;
                        require(
                            r.flags & both != both,
                            wire::ENOTSUP,
                            "zeroing without holes is not known to be fast",
                        )
                    });
                match checked {
                    Err(f) => self.queue_error(&r, f),
                    Ok(()) => {
                        let mut bio =
                            Bio::no_data(BioCmd::WriteZeroes, r.offset, u64::from(r.length));
                        bio.no_hole = r.flags & wire::CMD_FLAG_NO_HOLE != 0;
                        self.queue_bio(&r, bio, 0);
                    }
                }
            }
            // proto.md NBD_CMD_CACHE: a hint; there is no cache to warm, so
            // a valid request is answered at once.
            Command::Cache => {
                match check_flags(&r, fua).and_then(|()| check_range(&sel, &r, wire::EINVAL)) {
                    Err(f) => self.queue_error(&r, f),
                    Ok(()) => {
                        let idx = self.alloc_slot(&r);
                        self.slots[idx as usize].state = SlotState::Reply(Reply::default());
                        self.replies.push_back(idx);
                    }
                }
            }
            Command::BlockStatus => {
                let checked = check_flags(&r, fua | wire::CMD_FLAG_REQ_ONE)
                    .and_then(|()| {
                        // proto.md "Metadata querying": EINVAL without a
                        // selected context (which needs structured replies).
                        require(
                            sel.allocation && self.structured,
                            wire::EINVAL,
                            "no metadata context was selected",
                        )
                    })
                    .and_then(|()| require(r.length > 0, wire::EINVAL, "zero-length query"))
                    .and_then(|()| check_range(&sel, &r, wire::EINVAL));
                self.queue_no_data(&r, checked, BioCmd::GetAllocation);
            }
            // proto.md "Error values": EINVAL for an unknown command.
            Command::Unknown(_) => {
                self.queue_error(&r, fail(wire::EINVAL, "command not supported"))
            }
        }
    }

    fn check_read(&self, sel: &Selected, r: &RequestRepr) -> Result<(), Fail> {
        // NBD_CMD_FLAG_DF is valid only where NBD_FLAG_SEND_DF was sent,
        // that is with structured replies; every read is one chunk anyway.
        let df = if self.structured {
            wire::CMD_FLAG_DF
        } else {
            0
        };
        check_flags(r, wire::CMD_FLAG_FUA | df)?;
        if r.length > sel.limits.max_payload {
            // proto.md NBD_CMD_READ: with structured replies a large read may
            // be rejected with EOVERFLOW; simple replies use EINVAL.
            let errno = if self.structured {
                wire::EOVERFLOW
            } else {
                wire::EINVAL
            };
            return Err(fail(errno, "read longer than the maximum payload"));
        }
        check_range(sel, r, wire::EINVAL)
    }

    // ---- write payloads ----

    /// A write's header: check it, then either take its payload into fresh
    /// pages or reply with the error and skip the payload unread.
    fn start_write(&mut self, sel: &Selected, r: &RequestRepr) {
        let checked = check_flags(r, wire::CMD_FLAG_FUA)
            .and_then(|()| check_writable(sel))
            .and_then(|()| {
                require(
                    r.length <= sel.limits.max_payload,
                    wire::EINVAL,
                    "write longer than the maximum payload",
                )
            })
            .and_then(|()| check_range(sel, r, wire::ENOSPC));
        if let Err(f) = checked {
            self.refuse_write(r, f);
            return;
        }
        self.rx = Rx::Admit(*r);
        self.admit_self();
    }

    /// A checked read or write whose pages were admitted into the
    /// service's budget ([`Connection::grant`]) and allocated: the read
    /// goes out as a bio, the write takes its payload into `sg`.
    pub(super) fn start_admitted(&mut self, r: &RequestRepr, sg: SgList) {
        if r.command == Command::Read {
            let bio = Bio::with_data(BioCmd::Read, r.offset, sg);
            self.queue_bio(r, bio, u64::from(r.length));
            return;
        }
        let idx = self.alloc_slot(r);
        let held = u64::from(r.length);
        self.slots[idx as usize].held = held;
        self.held_bytes += held;
        self.slots[idx as usize].state = SlotState::Receiving(sg);
        if r.length == 0 {
            self.finish_write(idx);
        } else {
            self.rx = Rx::WriteData { slot: idx, got: 0 };
        }
    }

    /// Answers a write with an error, skipping its payload unread. The reply
    /// goes out only after the payload: a client may not expect a reply to
    /// a request it has not finished sending.
    fn refuse_write(&mut self, r: &RequestRepr, f: Fail) {
        let slot = self.alloc_error(r, f);
        if r.length > 0 {
            self.rx = Rx::Skip {
                left: r.length,
                slot,
            };
        } else {
            self.replies.push_back(slot);
        }
    }

    pub(super) fn write_data(&mut self, idx: u32, got: u32, input: &[u8]) -> usize {
        let Some(slot) = self.slots.get(idx as usize) else {
            self.hard_close();
            return 0;
        };
        let SlotState::Receiving(sg) = &slot.state else {
            self.hard_close();
            return 0;
        };
        let k = ((slot.length - got) as usize).min(input.len());
        // The only copy of write data: receive buffer → pages.
        if sg
            .copy_from_slice(u64::from(got), &input[..k], &self.counters)
            .is_err()
        {
            self.hard_close();
            return 0;
        }
        let got = got + k as u32;
        if got == slot.length {
            self.finish_write(idx);
            self.rx = Rx::ReqHeader;
        } else {
            self.rx = Rx::WriteData { slot: idx, got };
        }
        k
    }

    /// When the next input bytes are the payload of a write, the pages they
    /// belong in (at most `max_pieces` pieces), so the platform can receive
    /// straight into them (`readv`); returns how many bytes the pieces
    /// cover (0 when input must go through [`Connection::on_recv`]). Call
    /// [`Connection::rx_filled`] with the number of bytes placed.
    pub fn rx_pieces<'a, const N: usize>(&'a self, out: &mut ArrayVec<PageSlice<'a>, N>) -> usize {
        let Rx::WriteData { slot, got } = self.rx else {
            return 0;
        };
        if self.closing.is_some() {
            return 0;
        }
        let Some(Slot {
            state: SlotState::Receiving(sg),
            ..
        }) = self.slots.get(slot as usize)
        else {
            return 0;
        };
        let mut skip = u64::from(got);
        let mut bytes = 0;
        for r in sg.iter() {
            if out.is_full() {
                break;
            }
            let len = u64::from(r.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let piece = PageSlice {
                page: &r.page,
                offset: r.offset as usize + skip as usize,
                len: (len - skip) as usize,
            };
            skip = 0;
            bytes += piece.len;
            out.push(piece);
        }
        bytes
    }

    /// Records that `n` bytes of write payload were placed in the pages
    /// from [`Connection::rx_pieces`] (at most what they cover).
    pub fn rx_filled(&mut self, n: usize) {
        let Rx::WriteData { slot, got } = self.rx else {
            return;
        };
        let Some(s) = self.slots.get(slot as usize) else {
            return;
        };
        let n = (n as u64).min(u64::from(s.length - got)) as u32;
        self.active |= n > 0;
        let got = got + n;
        if got == s.length {
            self.finish_write(slot);
            self.rx = Rx::ReqHeader;
        } else {
            self.rx = Rx::WriteData { slot, got };
        }
    }

    fn finish_write(&mut self, idx: u32) {
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        if let SlotState::Receiving(sg) = mem::take(&mut slot.state) {
            let mut bio = Bio::with_data(BioCmd::Write, slot.offset, sg);
            bio.fua = slot.flags & wire::CMD_FLAG_FUA != 0;
            slot.state = SlotState::Ready(bio);
            self.ready.push_back(idx);
        }
    }

    // ---- bios and replies ----

    fn queue_no_data(&mut self, r: &RequestRepr, checked: Result<(), Fail>, cmd: BioCmd) {
        match checked {
            Err(f) => self.queue_error(r, f),
            Ok(()) => self.queue_bio(r, Bio::no_data(cmd, r.offset, u64::from(r.length)), 0),
        }
    }

    fn queue_bio(&mut self, r: &RequestRepr, mut bio: Bio, held: u64) {
        bio.fua = r.flags & wire::CMD_FLAG_FUA != 0 && bio.cmd.is_write();
        let idx = self.alloc_slot(r);
        let slot = &mut self.slots[idx as usize];
        slot.held = held;
        slot.state = SlotState::Ready(bio);
        self.held_bytes += held;
        self.ready.push_back(idx);
    }

    fn queue_error(&mut self, r: &RequestRepr, f: Fail) {
        let idx = self.alloc_error(r, f);
        self.replies.push_back(idx);
    }

    /// A slot holding an error reply, not yet queued for sending.
    fn alloc_error(&mut self, r: &RequestRepr, f: Fail) -> u32 {
        let idx = self.alloc_slot(r);
        self.slots[idx as usize].state = SlotState::Reply(Reply {
            error: f.errno,
            message: f.message,
            ..Reply::default()
        });
        idx
    }

    /// The next bio to submit, if any.
    pub fn next_request(&mut self) -> Option<Request> {
        let export = self.selected?.index;
        while let Some(idx) = self.ready.pop_front() {
            let Some(slot) = self.slots.get_mut(idx as usize) else {
                continue;
            };
            match mem::replace(&mut slot.state, SlotState::Submitted) {
                SlotState::Ready(bio) => {
                    self.submitted += 1;
                    return Some(Request {
                        export,
                        bio,
                        cookie: u64::from(idx),
                    });
                }
                other => slot.state = other,
            }
        }
        None
    }

    /// Hands back a bio from [`Connection::next_request`] with its result.
    /// Returns false (and drops the bio) if `cookie` names no submitted
    /// request of this connection.
    pub fn complete(&mut self, cookie: u64, bio: Bio, result: BioResult) -> bool {
        let Ok(idx) = usize::try_from(cookie) else {
            return false;
        };
        let Some(slot) = self.slots.get_mut(idx) else {
            return false;
        };
        if !matches!(slot.state, SlotState::Submitted) {
            return false;
        }
        self.submitted -= 1;
        if self.closing == Some(Close::Hard) {
            drop(bio);
            self.free_slot(idx);
            return true;
        }
        // No memory below (a memory disk's pages): the same bio goes
        // again a little later, its pages still held.
        let mut held = Some(bio);
        if result == Err(BioError::NoMemory) && self.park_for_retry(idx, &mut held) {
            return true;
        }
        let Some(mut bio) = held else {
            return false;
        };
        if bio.cmd == BioCmd::Write {
            // A write's pages are done with: keep them for later requests.
            self.recycle(mem::take(&mut bio.sg));
        }
        let Some(slot) = self.slots.get_mut(idx) else {
            return false;
        };
        let reply = match result {
            Ok(()) if slot.command == Command::Read => {
                if bio.sg.len_bytes() == u64::from(slot.length) {
                    Reply {
                        bio: Some(bio),
                        ..Reply::default()
                    }
                } else {
                    Reply {
                        error: wire::EIO,
                        message: "device returned the wrong amount of data",
                        ..Reply::default()
                    }
                }
            }
            Ok(()) if slot.command == Command::BlockStatus => Reply {
                extents: descriptors(&bio.extents, slot.length, slot.flags),
                ..Reply::default()
            },
            // proto.md NBD_CMD_BLOCK_STATUS: an error that is not misuse may
            // be answered with one descriptor; a provider that cannot
            // answer knows nothing, so everything counts as data.
            Err(BioError::NotSupported) if slot.command == Command::BlockStatus => Reply {
                extents: descriptors(&[], slot.length, slot.flags),
                ..Reply::default()
            },
            Ok(()) => Reply::default(),
            Err(e) => Reply {
                error: errno_for(slot.command, e),
                message: message_for(e),
                ..Reply::default()
            },
        };
        // A write's pages (or a failed read's) are dropped now; block status
        // descriptors count against the budget until they are sent.
        self.held_bytes -= mem::take(&mut slot.held);
        if let Some(b) = &reply.bio {
            slot.held = b.sg.len_bytes();
        }
        slot.held += reply.extents.len() as u64;
        self.held_bytes += slot.held;
        slot.state = SlotState::Reply(reply);
        self.replies.push_back(idx as u32);
        true
    }
}

// ---- request checks (proto.md "Size constraints", "Error values") ----

/// Unknown or inapplicable command flags → EINVAL. FUA is accepted on every
/// command (proto.md "Command flags") and acted on for writes.
fn check_flags(r: &RequestRepr, allowed: u16) -> Result<(), Fail> {
    if r.flags & !allowed != 0 {
        Err(fail(wire::EINVAL, "unsupported command flags"))
    } else {
        Ok(())
    }
}

fn check_writable(sel: &Selected) -> Result<(), Fail> {
    require(!sel.read_only, wire::EPERM, "export is read-only")
}

/// `Ok` if `cond` holds, else the error.
fn require(cond: bool, errno: u32, message: &'static str) -> Result<(), Fail> {
    if cond {
        Ok(())
    } else {
        Err(fail(errno, message))
    }
}

/// Bounds (with `past_end` as the errno) and minimum-block alignment.
fn check_range(sel: &Selected, r: &RequestRepr, past_end: u32) -> Result<(), Fail> {
    match r.offset.checked_add(u64::from(r.length)) {
        Some(end) if end <= sel.size => {}
        _ => return Err(fail(past_end, "request goes past the end of the export")),
    }
    let mb = u64::from(sel.limits.min_block.max(1));
    if !r.offset.is_multiple_of(mb) || !u64::from(r.length).is_multiple_of(mb) {
        return Err(fail(
            wire::EINVAL,
            "request not aligned to the minimum block size",
        ));
    }
    Ok(())
}

/// A bio error as an NBD error value: the POSIX errno when NBD defines it,
/// with ENOSPC only for writes past the end (EINVAL otherwise), EINVAL for
/// an unsupported operation (proto.md reserves ENOTSUP for fast zeroes),
/// and EIO for anything NBD has no value for (a vanished provider).
fn errno_for(command: Command, e: BioError) -> u32 {
    match e {
        BioError::OutOfRange if matches!(command, Command::Write | Command::WriteZeroes) => {
            wire::ENOSPC
        }
        BioError::OutOfRange | BioError::NotSupported => wire::EINVAL,
        _ => match u32::try_from(e.errno()) {
            Ok(
                v @ (wire::EPERM
                | wire::EIO
                | wire::ENOMEM
                | wire::EINVAL
                | wire::ENOSPC
                | wire::EOVERFLOW
                | wire::ESHUTDOWN),
            ) => v,
            _ => wire::EIO,
        },
    }
}

fn message_for(e: BioError) -> &'static str {
    match e {
        BioError::Io => "input/output error",
        BioError::Invalid => "invalid request",
        BioError::OutOfRange => "request goes past the end of the device",
        BioError::Orphaned => "the device is gone",
        BioError::Access => "permission denied",
        BioError::NotSupported => "operation not supported",
        BioError::NoMemory => "out of memory",
        BioError::NoSpace => "no space left on the device",
    }
}

/// `base:allocation` descriptors for an `NBD_REPLY_TYPE_BLOCK_STATUS`
/// chunk (u32 length, u32 flags each) from the runs a provider reported:
/// cut to the request's `length`, adjacent runs of equal status merged,
/// only the first with `NBD_CMD_FLAG_REQ_ONE`, at most
/// [`MAX_REPLY_EXTENTS`]. A range the provider said nothing about is one
/// data descriptor (flags 0: allocated, contents unknown).
fn descriptors(runs: &[Extent], length: u32, cmd_flags: u16) -> Vec<u8> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = length;
    for e in runs {
        if left == 0 {
            break;
        }
        let n = u32::try_from(e.length).unwrap_or(u32::MAX).min(left);
        if n == 0 {
            continue;
        }
        let hole = if e.hole { wire::STATE_HOLE } else { 0 };
        let status = hole | if e.zero { wire::STATE_ZERO } else { 0 };
        let count = out.len();
        match out.last_mut() {
            Some(last) if last.1 == status => last.0 += n,
            _ if count == MAX_REPLY_EXTENTS => break,
            _ => out.push((n, status)),
        }
        left -= n;
    }
    if out.is_empty() {
        out.push((length, 0));
    }
    if cmd_flags & wire::CMD_FLAG_REQ_ONE != 0 {
        out.truncate(1);
    }
    let mut bytes = Vec::with_capacity(out.len() * 8);
    for (n, status) in out {
        bytes.extend_from_slice(&n.to_be_bytes());
        bytes.extend_from_slice(&status.to_be_bytes());
    }
    bytes
}
