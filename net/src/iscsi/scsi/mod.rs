//! The SCSI command layer (SPC-4, SBC-3) of the iSCSI target: one
//! [`Task`] per SCSI Command PDU, from the CDB to the status, sense data
//! and data it answers with. Sans-I/O: the task hands out bios and takes
//! their completions, the engine moves the bytes.
//!
//! ```text
//!   Task::new ─▶ pages_wanted() > 0 ? (budget) alloc()
//!            ─▶ data_out_want() > 0 ? fill data_out_sg(), data_out_done()
//!            ─▶ loop next_bio() / complete() until is_done()
//!            ─▶ response()
//! ```
//!
//! Files: [`sense`] (sense data), `inquiry` (standard INQUIRY and VPD
//! pages, REPORT LUNS), `mode` (mode pages, MODE SENSE/SELECT), `block`
//! (the SBC commands and their bios), `pr` (persistent reservations and
//! RESERVE/RELEASE(6)), `opcodes` (the command table that dispatch and
//! REPORT SUPPORTED OPERATION CODES share).
//!
//! Notes on the interface:
//! - [`Unit::lun`] is the LUN number; REPORT LUNS encodes numbers below
//!   256 with peripheral addressing and below 16384 with flat space
//!   addressing; larger values are taken as the 8-byte SAM LUN itself.
//! - [`UnitState::target_reset`] is the TARGET WARM RESET twin of
//!   [`UnitState::lun_reset`] (unit attention 29h/00h instead of 29h/03h).
//! - Unit attentions are queued for the nexuses the unit has seen (a nexus
//!   is seen from its first command until [`UnitState::nexus_gone`]).
//! - WRITE AND VERIFY writes with FUA, then reads the range back and
//!   compares it with the Data-Out (MISCOMPARE on a difference).
//! - On a unit whose export [`ExportInfo::keeps_state`], PERSISTENT
//!   RESERVE OUT answers only once the engine has had the unit's
//!   persistent state kept ([`Task::take_save`], [`Task::saved`]), and
//!   REPORT CAPABILITIES sets PTPL_C; elsewhere APTPL is refused with
//!   INVALID FIELD IN PARAMETER LIST.
//! - PREEMPT AND ABORT acts as PREEMPT: aborting the preempted nexuses'
//!   tasks is the engine's part.
//! - COMPARE AND WRITE reads, compares and writes; [`Task::atomic_range`]
//!   names the bytes the engine holds against other writes meanwhile.
//! - SWP (software write protect) in the Control mode page is unit state:
//!   once a MODE SELECT sets it, every command that would change the
//!   medium (WRITE, WRITE AND VERIFY, WRITE SAME, UNMAP, COMPARE AND
//!   WRITE) fails with DATA PROTECT, 27h/02h, for every nexus, until a
//!   MODE SELECT clears it; it is checked when the command arrives and
//!   again when its Data-Out is in. An export read-only by configuration
//!   answers 27h/00h instead. Like D_SENSE it is not saved and survives
//!   resets.
//! - A bio failing with [`BioError::NoMemory`] answers BUSY; a task never
//!   panics, whatever the CDB, the parameter data or the bio results.

mod block;
mod inquiry;
mod mode;
mod opcodes;
mod pr;
pub mod sense;
#[cfg(test)]
mod tests;

use crate::session::ExportInfo;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use geom::bio::{Bio, BioCmd, BioError, BioResult};
use geom::page::{NoMemory, Page, PageRef, SgList, PAGE_SIZE};
use sense::Sense;

/// Largest transfer one command may ask for, in bytes (reported in the
/// Block Limits VPD page; bigger transfers get INVALID FIELD IN CDB).
pub const MAX_TRANSFER_BYTES: u32 = 32 << 20;

/// Status GOOD.
pub const GOOD: u8 = 0x00;
/// Status CHECK CONDITION (sense data follows).
pub const CHECK_CONDITION: u8 = 0x02;
/// Status CONDITION MET.
pub const CONDITION_MET: u8 = 0x04;
/// Status BUSY (the initiator retries later).
pub const BUSY: u8 = 0x08;
/// Status RESERVATION CONFLICT.
pub const RESERVATION_CONFLICT: u8 = 0x18;

/// What the layer knows of one logical unit; `export: None` for a LUN the
/// target does not have.
pub struct Unit<'a> {
    /// The export behind the LUN, if there is one.
    pub export: Option<&'a ExportInfo>,
    /// The LUN number.
    pub lun: u64,
    /// The target's IQN (for VPD 83h designators).
    pub target: &'a str,
    /// Every LUN of this target (REPORT LUNS).
    pub luns: &'a [u64],
    /// State shared by all sessions to this LU.
    pub state: &'a mut UnitState,
}

/// The I_T nexus a command comes from.
pub struct Nexus<'a> {
    /// The initiator's iSCSI name.
    pub initiator: &'a str,
    /// The session's ISID.
    pub isid: [u8; 6],
    /// The target portal group tag.
    pub tpgt: u16,
    /// Unique per nexus.
    pub id: u64,
}

/// A command as the transport received it.
pub struct Command<'a> {
    /// The CDB: 16 bytes, or longer.
    pub cdb: &'a [u8],
    /// Expected Data-Out length if the W bit was set, else 0.
    pub data_out_len: u32,
    /// Expected Data-In length if the R bit was set, else 0.
    pub data_in_len: u32,
}

/// The answer to a command.
#[derive(Debug)]
pub struct Response {
    /// SCSI status.
    pub status: u8,
    /// Sense data; empty unless CHECK CONDITION.
    pub sense: Vec<u8>,
    /// The bytes the command transfers (the engine truncates them to the
    /// expected length and computes residuals).
    pub data_in: DataIn,
}

/// The Data-In of a response.
#[derive(Debug)]
pub enum DataIn {
    /// No data.
    None,
    /// Data built by the layer.
    Bytes(Vec<u8>),
    /// Read data in the bio's pages.
    Pages(SgList),
}

/// A nexus the unit has seen, with its pending unit attentions.
#[derive(Clone, Debug, Default)]
struct Seen {
    id: u64,
    initiator: String,
    isid: [u8; 6],
    tpgt: u16,
    ua: VecDeque<Sense>,
}

/// Most unit attentions queued for one nexus (older ones are dropped).
const MAX_UA: usize = 8;

/// State of one logical unit shared by all its sessions: mode page values,
/// persistent reservations, the SPC-2 reservation and the pending unit
/// attentions of each nexus.
#[derive(Clone, Debug, Default)]
pub struct UnitState {
    /// D_SENSE in the Control mode page: descriptor-format sense data.
    d_sense: bool,
    /// SWP in the Control mode page: the medium is write-protected.
    swp: bool,
    /// Persistent reservations.
    pr: pr::PrState,
    /// The nexus id holding a RESERVE(6) reservation.
    spc2: Option<u64>,
    /// Nexuses seen, with their unit attentions.
    seen: Vec<Seen>,
}

impl UnitState {
    /// Task management LOGICAL UNIT RESET from `from`: clears the SPC-2
    /// reservation and sets unit attention 29h/03h for every nexus.
    pub fn lun_reset(&mut self, from: &Nexus<'_>) {
        self.reset(from, sense::UA_LUN_RESET);
    }

    /// Task management TARGET WARM RESET from `from`: as
    /// [`UnitState::lun_reset`], with unit attention 29h/00h.
    pub fn target_reset(&mut self, from: &Nexus<'_>) {
        self.reset(from, sense::UA_RESET);
    }

    fn reset(&mut self, from: &Nexus<'_>, ua: Sense) {
        self.spc2 = None;
        // Every nexus, the one that asked too (SAM-5 6.3.3: the reset
        // condition is reported on all of them; libiscsi's MultipathIO
        // reset test looks for it on each path).
        if !self.seen.iter().any(|s| s.id == from.id) {
            self.see(from);
        }
        let all: Vec<u64> = self.seen.iter().map(|s| s.id).collect();
        for i in all {
            self.ua_for(i, ua);
        }
    }

    /// A session ended: a RESERVE(6) it held is released and its unit
    /// attentions are dropped; persistent registrations stay.
    pub fn nexus_gone(&mut self, nexus: &Nexus<'_>) {
        if self.spc2 == Some(nexus.id) {
            self.spc2 = None;
        }
        self.seen.retain(|s| s.id != nexus.id);
    }

    /// The part that persists through power loss (APTPL): persistent
    /// registrations and the reservation.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.pr.to_bytes()
    }

    /// True when the state asks to persist through power loss (the last
    /// registration set APTPL).
    pub fn persists(&self) -> bool {
        self.pr.aptpl()
    }

    /// A state holding the persistent part saved by
    /// [`UnitState::to_bytes`]; `None` if the bytes are not such a record.
    pub fn from_bytes(b: &[u8]) -> Option<UnitState> {
        Some(UnitState {
            pr: pr::PrState::from_bytes(b)?,
            ..UnitState::default()
        })
    }

    /// Refuses writing to the medium of `export`: WRITE PROTECTED
    /// (27h/00h) when the export is read-only, LOGICAL UNIT SOFTWARE
    /// WRITE PROTECTED (27h/02h) while SWP is set.
    fn write_protect(&self, export: &ExportInfo) -> Res<()> {
        if export.read_only {
            Err(sense::WRITE_PROTECTED.into())
        } else if self.swp {
            Err(sense::SOFTWARE_WRITE_PROTECTED.into())
        } else {
            Ok(())
        }
    }

    /// Records the nexus as seen.
    fn see(&mut self, n: &Nexus<'_>) {
        if self.seen.iter().any(|s| s.id == n.id) {
            return;
        }
        self.seen.push(Seen {
            id: n.id,
            initiator: String::from(n.initiator),
            isid: n.isid,
            tpgt: n.tpgt,
            ua: VecDeque::new(),
        });
    }

    /// Queues a unit attention for one nexus.
    fn ua_for(&mut self, id: u64, ua: Sense) {
        if let Some(s) = self.seen.iter_mut().find(|s| s.id == id) {
            if s.ua.len() >= MAX_UA {
                s.ua.pop_front();
            }
            s.ua.push_back(ua);
        }
    }

    /// Queues a unit attention for every seen nexus but `id`.
    fn ua_others(&mut self, id: u64, ua: Sense) {
        let ids: Vec<u64> = self
            .seen
            .iter()
            .map(|s| s.id)
            .filter(|&i| i != id)
            .collect();
        for i in ids {
            self.ua_for(i, ua);
        }
    }

    /// Queues a unit attention for every seen nexus of the I_T nexus
    /// identity (initiator port and target portal group).
    fn ua_port(&mut self, port: &pr::Port, ua: Sense) {
        let ids: Vec<u64> = self
            .seen
            .iter()
            .filter(|s| port.is(&s.initiator, s.isid, s.tpgt))
            .map(|s| s.id)
            .collect();
        for i in ids {
            self.ua_for(i, ua);
        }
    }

    /// Takes the oldest pending unit attention of a nexus.
    fn take_ua(&mut self, id: u64) -> Option<Sense> {
        self.seen.iter_mut().find(|s| s.id == id)?.ua.pop_front()
    }
}

/// Why a command fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// RESERVATION CONFLICT.
    Conflict,
    /// BUSY (no memory or queue space).
    Busy,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Fail {
        Fail::Check(s)
    }
}

/// The outcome of a step: its value or the failure.
type Res<T> = Result<T, Fail>;

/// The export of a unit with the numbers the commands use.
#[derive(Clone, Copy, Debug)]
struct Geometry<'a> {
    export: &'a ExportInfo,
    /// Logical block size in bytes.
    bs: u32,
    /// Number of logical blocks.
    blocks: u64,
}

impl<'a> Geometry<'a> {
    fn new(export: &'a ExportInfo) -> Geometry<'a> {
        let bs = export.min_block.clamp(512, 64 << 10);
        let bs = if bs.is_power_of_two() { bs } else { 512 };
        Geometry {
            export,
            bs,
            blocks: export.size_bytes / u64::from(bs),
        }
    }

    /// Largest transfer in blocks.
    fn max_transfer_blocks(&self) -> u32 {
        let mut max = MAX_TRANSFER_BYTES;
        if self.export.max_block >= self.bs {
            max = max.min(self.export.max_block);
        }
        (max / self.bs).max(1)
    }

    /// Physical block exponent (logical blocks per physical block, log2):
    /// 0. The provider's preferred block is a hint, which Block Limits
    /// gives as the optimal transfer length granularity; READ CAPACITY
    /// (16) does not repeat it, as libiscsi 1.19's GET LBA STATUS test
    /// reads the exponent as the step between the LBAs it asks about.
    fn lbppb_exp(&self) -> u8 {
        0
    }

    /// Checks `[lba, lba + n)` lies within the unit.
    fn check_range(&self, lba: u64, n: u64) -> Res<()> {
        match lba.checked_add(n) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(sense::LBA_OUT_OF_RANGE.into()),
        }
    }

    /// Byte offset and length of a block range (checked).
    fn bytes(&self, lba: u64, n: u64) -> Res<(u64, u64)> {
        let bs = u64::from(self.bs);
        let off = lba.checked_mul(bs).ok_or(sense::LBA_OUT_OF_RANGE)?;
        let len = n.checked_mul(bs).ok_or(sense::LBA_OUT_OF_RANGE)?;
        Ok((off, len))
    }
}

/// How a verifying command compares what it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    /// No compare: the read only checks the medium.
    None,
    /// Byte for byte with the Data-Out.
    Full,
    /// Every block with the one block of Data-Out.
    Block,
}

/// How WRITE SAME is carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ws {
    /// A Discard bio.
    Discard,
    /// A WriteZeroes bio, keeping the range allocated or not.
    Zeroes { no_hole: bool },
    /// The block replicated into pages and written chunk by chunk.
    Replicate,
    /// Decided once the Data-Out block is known (zero or not).
    Later { unmap: bool },
}

/// What a task does once its pages and Data-Out are in.
#[derive(Debug)]
enum Kind {
    /// Nothing: the response is ready.
    Done,
    /// Read `len` bytes at `off`.
    Read { off: u64, fua: bool },
    /// Write the Data-Out at `off`; `verify` reads it back and compares.
    Write {
        off: u64,
        len: u64,
        fua: bool,
        verify: bool,
    },
    /// Read `len` bytes at `off` and compare.
    Verify { off: u64, len: u64, cmp: Cmp },
    /// COMPARE AND WRITE of `len` bytes at `off`.
    Caw { off: u64, len: u64, fua: bool },
    /// WRITE SAME over `len` bytes at `off`.
    WriteSame {
        off: u64,
        len: u64,
        how: Ws,
        ndob: bool,
    },
    /// UNMAP with its parameter list in the Data-Out.
    Unmap,
    /// SYNCHRONIZE CACHE.
    Flush,
    /// GET LBA STATUS from `lba`, answering with at most `alloc` bytes.
    LbaStatus { lba: u64, alloc: u32 },
    /// MODE SELECT (6 or 10) with its parameter list in the Data-Out.
    ModeSelect { ten: bool },
    /// PERSISTENT RESERVE OUT.
    PrOut { sa: u8, scope_type: u8 },
}

impl Kind {
    /// The task writes to the medium (and write protection refuses it).
    fn changes_medium(&self) -> bool {
        matches!(
            self,
            Kind::Write { .. } | Kind::Caw { .. } | Kind::WriteSame { .. } | Kind::Unmap
        )
    }

    /// The task cannot go on without Data-Out.
    fn needs_data_out(&self) -> bool {
        match self {
            Kind::Write { .. }
            | Kind::Caw { .. }
            | Kind::Unmap
            | Kind::ModeSelect { .. }
            | Kind::PrOut { .. } => true,
            Kind::Verify { cmp, .. } => *cmp != Cmp::None,
            Kind::WriteSame { how, .. } => matches!(how, Ws::Later { .. }),
            _ => false,
        }
    }
}

/// Most bytes one WRITE SAME chunk writes.
const WS_CHUNK: u64 = 1 << 20;

/// One SCSI command's state machine.
#[derive(Debug)]
pub struct Task {
    kind: Kind,
    /// Block size of the unit (512 for a unit without export).
    bs: u32,
    /// Descriptor-format sense, as D_SENSE was when the task began.
    d_sense: bool,
    /// The provider accepts Discard.
    can_trim: bool,
    /// The provider accepts WriteZeroes.
    can_wz: bool,
    /// Logical blocks of the unit.
    blocks: u64,
    /// The runs a GetAllocation bio reported.
    extents: Vec<geom::bio::Extent>,
    /// The parameter or write data to take, in bytes.
    out_want: u32,
    /// Its pages.
    out_sg: Option<SgList>,
    /// Other pages the task holds (read buffer, WRITE SAME chunk).
    buf_len: u64,
    buf: Option<SgList>,
    /// Pages were allocated (or none are wanted).
    allocated: bool,
    /// The Data-Out was placed (or none is wanted).
    data_in: bool,
    /// The first bios were queued.
    started: bool,
    /// Step of a multi-step command.
    phase: u8,
    /// Progress in bytes (WRITE SAME chunks).
    pos: u64,
    queue: VecDeque<Bio>,
    inflight: u32,
    next_tag: u32,
    /// The first failure, reported once every bio is back.
    fail: Option<Fail>,
    /// The unit's persistent state to keep before answering (a PERSISTENT
    /// RESERVE OUT on a unit that keeps it), until taken.
    save: Option<Vec<u8>>,
    /// Waiting for [`Task::saved`].
    saving: bool,
    /// The answer, once done.
    resp: Option<Response>,
}

impl Task {
    /// Parses and checks the CDB (opcode, service action, fields, LBA
    /// range, reservation conflicts, unit attention), allocating no page.
    pub fn new(cmd: &Command<'_>, unit: &mut Unit<'_>, nexus: &Nexus<'_>) -> Task {
        let d_sense = unit.state.d_sense;
        let geo = unit.export.map(Geometry::new);
        let mut t = Task {
            kind: Kind::Done,
            bs: geo.map_or(512, |g| g.bs),
            d_sense,
            can_trim: unit.export.is_some_and(|e| e.can_trim),
            can_wz: unit.export.is_some_and(|e| e.can_write_zeroes),
            blocks: geo.map_or(0, |g| g.blocks),
            extents: Vec::new(),
            out_want: 0,
            out_sg: None,
            buf_len: 0,
            buf: None,
            allocated: true,
            data_in: true,
            started: false,
            phase: 0,
            pos: 0,
            queue: VecDeque::new(),
            inflight: 0,
            next_tag: 0,
            fail: None,
            save: None,
            saving: false,
            resp: None,
        };
        unit.state.see(nexus);
        match dispatch(&mut t, cmd, unit, nexus, geo) {
            Ok(Some(data)) => t.finish_data(data),
            Ok(None) if t.out_want == 0 && t.kind.needs_data_out() => {
                // Nothing would ever complete the task.
                t.kind = Kind::Done;
                t.buf_len = 0;
                t.finish_fail(sense::INVALID_FIELD_IN_IU.into());
            }
            Ok(None) => {
                t.allocated = t.pages_wanted() == 0;
                t.data_in = t.out_want == 0;
                if matches!(t.kind, Kind::Done) {
                    t.finish_data(DataIn::None);
                }
            }
            Err(f) => {
                t.out_want = 0;
                t.buf_len = 0;
                t.kind = Kind::Done;
                t.finish_fail(f);
            }
        }
        t
    }

    /// Payload bytes the task will hold once allocated (read data, write
    /// data, parameter lists), whole pages, for the engine's budget.
    pub fn pages_wanted(&self) -> u64 {
        if self.resp.is_some() {
            return 0;
        }
        let pages = |n: u64| n.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
        pages(u64::from(self.out_want)).saturating_add(pages(self.buf_len))
    }

    /// Allocates the task's pages (fallibly: `Err` means retry later,
    /// nothing held).
    pub fn alloc(&mut self) -> Result<(), NoMemory> {
        if self.allocated || self.resp.is_some() {
            self.allocated = true;
            return Ok(());
        }
        let out = try_sg(u64::from(self.out_want))?;
        let buf = try_sg(self.buf_len)?;
        self.out_sg = (self.out_want > 0).then_some(out);
        self.buf = (self.buf_len > 0).then_some(buf);
        self.allocated = true;
        Ok(())
    }

    /// Bytes of Data-Out the command consumes (≤ `data_out_len`; 0 for
    /// commands without Data-Out or already failed).
    pub fn data_out_want(&self) -> u32 {
        if self.resp.is_some() || self.data_in {
            0
        } else {
            self.out_want
        }
    }

    /// The pages the Data-Out goes into, exactly
    /// [`Task::data_out_want`] bytes (once allocated).
    pub fn data_out_sg(&self) -> Option<&SgList> {
        if self.data_out_want() == 0 {
            return None;
        }
        self.out_sg.as_ref()
    }

    /// All of the Data-Out has been placed.
    pub fn data_out_done(&mut self, unit: &mut Unit<'_>, nexus: &Nexus<'_>) {
        if self.data_in || self.resp.is_some() {
            return;
        }
        self.data_in = true;
        if !self.allocated || self.out_sg.is_none() {
            self.finish_fail(Fail::Busy);
            return;
        }
        let r = match self.kind {
            Kind::ModeSelect { ten } => {
                let p = self.out_bytes();
                p.and_then(|p| mode::select(unit, nexus, ten, &p))
                    .map(|()| DataIn::None)
            }
            Kind::PrOut { sa, scope_type } => {
                let p = self.out_bytes();
                let r = p.and_then(|p| pr::out(unit, nexus, sa, scope_type, &p));
                if r.is_ok() && unit.export.is_some_and(|e| e.keeps_state) {
                    // GOOD only once the new state is kept.
                    self.save = Some(unit.state.to_bytes());
                    self.saving = true;
                    return;
                }
                r.map(|()| DataIn::None)
            }
            _ => {
                self.try_start(unit);
                return;
            }
        };
        match r {
            Ok(d) => self.finish_data(d),
            Err(f) => self.finish_fail(f),
        }
    }

    /// The next bio to submit to the LU's provider, with a tag given back
    /// in [`Task::complete`]; `None` while waiting or when done.
    pub fn next_bio(&mut self, unit: &mut Unit<'_>) -> Option<(u32, Bio)> {
        self.try_start(unit);
        if self.fail.is_some() {
            return None;
        }
        let bio = self.queue.pop_front()?;
        self.inflight = self.inflight.saturating_add(1);
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        Some((tag, bio))
    }

    /// A bio handed out by [`Task::next_bio`] is back with its result.
    pub fn complete(&mut self, unit: &mut Unit<'_>, tag: u32, bio: Bio, result: BioResult) {
        let _ = (unit, tag);
        if self.resp.is_some() {
            return;
        }
        self.inflight = self.inflight.saturating_sub(1);
        match result {
            Err(e) => {
                if self.fail.is_none() {
                    self.fail = Some(bio_fail(bio.cmd, e));
                }
                self.queue.clear();
            }
            Ok(()) => block::completed(self, bio),
        }
        if self.inflight == 0 && self.queue.is_empty() {
            if let Some(f) = self.fail {
                self.finish_fail(f);
            } else {
                block::advance(self);
            }
        }
    }

    /// The unit's persistent state the engine must have kept (by the
    /// service) before the task can answer; then [`Task::saved`].
    pub fn take_save(&mut self) -> Option<Vec<u8>> {
        self.save.take()
    }

    /// The state from [`Task::take_save`] is kept, or could not be: GOOD,
    /// or HARDWARE ERROR, INTERNAL TARGET FAILURE (the change stands in
    /// memory but would not survive a restart).
    pub fn saved(&mut self, result: BioResult) {
        if self.resp.is_some() || !self.saving {
            return;
        }
        self.saving = false;
        match result {
            Ok(()) => self.finish_data(DataIn::None),
            Err(_) => self.finish_fail(sense::INTERNAL_FAILURE.into()),
        }
    }

    /// The byte range a COMPARE AND WRITE must hold against every other
    /// write while it runs (`None` for other commands, or once answered).
    pub fn atomic_range(&self) -> Option<(u64, u64)> {
        match self.kind {
            Kind::Caw { off, len, .. } if self.resp.is_none() => Some((off, len)),
            _ => None,
        }
    }

    /// True once the response is ready.
    pub fn is_done(&self) -> bool {
        self.resp.is_some()
    }

    /// The answer, once done (ABORTED COMMAND if asked too early).
    pub fn response(self) -> Response {
        let d_sense = self.d_sense;
        self.resp.unwrap_or_else(|| Response {
            status: CHECK_CONDITION,
            sense: Sense::new(sense::ABORTED_COMMAND, 0, 0).to_bytes(d_sense),
            data_in: DataIn::None,
        })
    }

    /// Queues the first bios once the pages and the Data-Out are in.
    fn try_start(&mut self, unit: &mut Unit<'_>) {
        if self.started || self.saving || self.resp.is_some() || !self.allocated || !self.data_in {
            return;
        }
        self.started = true;
        // Write protection may have come while the Data-Out was on its way.
        let protect = match unit.export {
            Some(e) if self.kind.changes_medium() => unit.state.write_protect(e),
            _ => Ok(()),
        };
        if let Err(f) = protect.and_then(|()| block::start(self)) {
            self.fail = Some(f);
            self.queue.clear();
        }
        if self.inflight == 0 && self.queue.is_empty() {
            match self.fail {
                Some(f) => self.finish_fail(f),
                None => block::advance(self),
            }
        }
    }

    /// Copies the Data-Out parameter list out of its pages.
    fn out_bytes(&self) -> Res<Vec<u8>> {
        let sg = self.out_sg.as_ref().ok_or(Fail::Busy)?;
        let mut v = Vec::new();
        v.try_reserve_exact(self.out_want as usize)
            .map_err(|_| Fail::Busy)?;
        v.resize(self.out_want as usize, 0);
        sg.copy_to_slice(0, &mut v, &geom::page::DataCounters::new())
            .map_err(|_| Fail::Check(sense::INTERNAL_FAILURE))?;
        Ok(v)
    }

    fn finish_data(&mut self, data: DataIn) {
        self.queue.clear();
        self.resp = Some(Response {
            status: GOOD,
            sense: Vec::new(),
            data_in: data,
        });
    }

    fn finish_fail(&mut self, f: Fail) {
        self.queue.clear();
        self.out_sg = None;
        self.buf = None;
        self.resp = Some(fail_response(f, self.d_sense));
    }

    /// Queues a bio.
    fn push(&mut self, bio: Bio) {
        self.queue.push_back(bio);
    }
}

/// The response for a failure.
fn fail_response(f: Fail, d_sense: bool) -> Response {
    let (status, sense) = match f {
        Fail::Check(s) => (CHECK_CONDITION, s.to_bytes(d_sense)),
        Fail::Conflict => (RESERVATION_CONFLICT, Vec::new()),
        Fail::Busy => (BUSY, Vec::new()),
    };
    Response {
        status,
        sense,
        data_in: DataIn::None,
    }
}

/// The failure a bio error is reported as.
fn bio_fail(cmd: BioCmd, e: BioError) -> Fail {
    match e {
        BioError::Io => match cmd {
            BioCmd::Read => sense::READ_ERROR.into(),
            BioCmd::Write | BioCmd::WriteZeroes => sense::WRITE_ERROR.into(),
            _ => sense::INTERNAL_FAILURE.into(),
        },
        BioError::Invalid => sense::INVALID_FIELD_IN_CDB.into(),
        BioError::OutOfRange => sense::LBA_OUT_OF_RANGE.into(),
        BioError::Orphaned => sense::NOT_READY_CAUSE.into(),
        BioError::Access => sense::WRITE_PROTECTED.into(),
        BioError::NotSupported => sense::INVALID_OPCODE.into(),
        BioError::NoMemory => Fail::Busy,
        BioError::NoSpace => sense::SPACE_ALLOC_FAILED.into(),
    }
}

/// Fresh zeroed pages covering `len` bytes, or [`NoMemory`].
fn try_sg(len: u64) -> Result<SgList, NoMemory> {
    let segs = usize::try_from(len.div_ceil(PAGE_SIZE as u64)).map_err(|_| NoMemory)?;
    let mut sg = SgList::try_with_capacity(segs)?;
    let mut left = len;
    while left > 0 {
        let n = left.min(PAGE_SIZE as u64);
        sg.push(PageRef {
            page: Page::try_new_zeroed()?,
            offset: 0,
            len: n as u32,
        });
        left -= n;
    }
    Ok(sg)
}

/// Big-endian field readers that never panic (missing bytes read as 0).
fn be(cdb: &[u8], at: usize, len: usize) -> u64 {
    let mut v = 0u64;
    for i in 0..len.min(8) {
        v = (v << 8) | u64::from(cdb.get(at + i).copied().unwrap_or(0));
    }
    v
}

/// One byte of a buffer (0 past its end).
fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// Truncates `data` to the allocation length.
fn truncated(mut data: Vec<u8>, alloc: u64) -> DataIn {
    if let Ok(a) = usize::try_from(alloc) {
        data.truncate(a);
    }
    DataIn::Bytes(data)
}

/// Runs the checks common to every command, then the command's own:
/// `Ok(Some(data))` when the answer is ready, `Ok(None)` when the task
/// goes on to pages, Data-Out and bios.
fn dispatch(
    t: &mut Task,
    cmd: &Command<'_>,
    unit: &mut Unit<'_>,
    nexus: &Nexus<'_>,
    geo: Option<Geometry<'_>>,
) -> Res<Option<DataIn>> {
    let cdb = cmd.cdb;
    let Some(&op) = cdb.first() else {
        return Err(sense::INVALID_OPCODE.into());
    };
    // A LUN without an export answers INQUIRY, REPORT LUNS and REQUEST
    // SENSE only (SAM-5 5.8.4).
    let Some(geo) = geo else {
        return match op {
            opcodes::INQUIRY => inquiry::inquiry(cdb, unit, None).map(Some),
            opcodes::REPORT_LUNS => inquiry::report_luns(cdb, unit).map(Some),
            opcodes::REQUEST_SENSE => {
                let desc = byte(cdb, 1) & 1 != 0;
                let data = sense::LU_NOT_SUPPORTED.to_bytes(desc);
                Ok(Some(truncated(data, be(cdb, 4, 1))))
            }
            _ => Err(sense::LU_NOT_SUPPORTED.into()),
        };
    };
    let entry = opcodes::lookup(cdb, unit.export)?;
    if !entry.ua_exempt {
        if let Some(ua) = unit.state.take_ua(nexus.id) {
            return Err(ua.into());
        }
    }
    pr::check_access(unit.state, nexus, entry.access)?;
    if cdb.len() < usize::from(entry.cdb_len()) {
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    match op {
        opcodes::TEST_UNIT_READY => Ok(Some(DataIn::None)),
        opcodes::REQUEST_SENSE => {
            let desc = byte(cdb, 1) & 1 != 0;
            let s = unit.state.take_ua(nexus.id).unwrap_or(sense::NO_SENSE_INFO);
            Ok(Some(truncated(s.to_bytes(desc), be(cdb, 4, 1))))
        }
        opcodes::INQUIRY => inquiry::inquiry(cdb, unit, Some(&geo)).map(Some),
        opcodes::REPORT_LUNS => inquiry::report_luns(cdb, unit).map(Some),
        opcodes::MODE_SENSE_6 | opcodes::MODE_SENSE_10 => {
            mode::sense(cdb, unit.state, &geo).map(Some)
        }
        opcodes::MODE_SELECT_6 | opcodes::MODE_SELECT_10 => {
            let ten = op == opcodes::MODE_SELECT_10;
            let (pf_sp, len) = if ten {
                (byte(cdb, 1), be(cdb, 7, 2))
            } else {
                (byte(cdb, 1), be(cdb, 4, 1))
            };
            if pf_sp & 0x01 != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB.into());
            }
            if len == 0 {
                return Ok(Some(DataIn::None));
            }
            t.out_want = param_want(cmd, len)?;
            t.kind = Kind::ModeSelect { ten };
            Ok(None)
        }
        opcodes::MAINTENANCE_IN => opcodes::report(cdb, unit.export).map(Some),
        opcodes::PERSISTENT_RESERVE_IN => {
            let keeps = unit.export.is_some_and(|e| e.keeps_state);
            pr::read(cdb, unit.state, nexus, keeps).map(Some)
        }
        opcodes::PERSISTENT_RESERVE_OUT => {
            let sa = byte(cdb, 1) & 0x1f;
            let len = be(cdb, 5, 4);
            pr::out_checks(sa, byte(cdb, 2), len)?;
            t.out_want = param_want(cmd, len)?;
            t.kind = Kind::PrOut {
                sa,
                scope_type: byte(cdb, 2),
            };
            if t.out_want == 0 {
                // A missing parameter list (SPC-4 6.15.3).
                return Err(sense::PARAM_LIST_LENGTH.into());
            }
            Ok(None)
        }
        opcodes::RESERVE_6 => pr::reserve6(cdb, unit.state, nexus).map(Some),
        opcodes::RELEASE_6 => pr::release6(cdb, unit.state, nexus).map(Some),
        _ => block::plan(t, cmd, &geo, unit.state),
    }
}

/// The Data-Out bytes a parameter list of `len` bytes takes: as much of
/// it as the initiator sends.
fn param_want(cmd: &Command<'_>, len: u64) -> Res<u32> {
    let len = u32::try_from(len).map_err(|_| sense::INVALID_FIELD_IN_CDB)?;
    if len > 1 << 20 {
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    if cmd.data_out_len == 0 {
        return Err(sense::PARAM_LIST_LENGTH.into());
    }
    Ok(len.min(cmd.data_out_len))
}
