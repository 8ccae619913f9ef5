//! SCSI commands over the connection (RFC 7143 §3.2.2, §4.2.7, §11.2–
//! 11.8): the CmdSN window, one SCSI-layer [`scsi::Task`] per command,
//! immediate and unsolicited data, R2Ts and solicited Data-Out placed
//! straight in the task's pages, the bios it makes, the Data-In PDUs
//! (status in the last one when there is no sense: phase collapse) or
//! the SCSI Response with sense and residuals, and task management.
//!
//! ```text
//!  SCSI Command ─▶ Task::new ─▶ [budget] ─▶ alloc ─▶ Data-Out (immediate,
//!  unsolicited, R2T'd) into data_out_sg ─▶ data_out_done ─▶ next_bio ⇄
//!  complete ─▶ response ─▶ Data-In PDUs / SCSI Response
//! ```

use super::tx::TxQueue;
use super::{atomic, Close, Connection, Sink};
use crate::iscsi::pdu::{self, op, Bhs, Sn, BHS_LEN, NO_TAG};
use crate::iscsi::scsi::{self, Command, DataIn, Nexus, Response, Unit, UnitState};
use crate::session::{ExportInfo, PageSlice, RxPieces, Work};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use geom::bio::{Bio, BioError, BioResult};
use geom::page::DataCounters;

/// State of every logical unit, shared by all sessions (reservations,
/// mode pages, unit attentions), by export name.
static UNITS: spin::Mutex<BTreeMap<String, UnitState>> = spin::Mutex::new(BTreeMap::new());

/// Takes the persistent state kept for the logical unit of export `name`
/// (what a [`Work::Save`] saved, [`UnitState::to_bytes`]) before any
/// session uses it; false when the bytes are not such a state. State
/// saved without APTPL restores nothing (SPC-4 5.13.5: the registrations
/// and the reservation are lost on power loss).
pub fn restore_unit(name: &str, bytes: &[u8]) -> bool {
    let Some(state) = UnitState::from_bytes(bytes) else {
        return false;
    };
    let state = if state.persists() {
        state
    } else {
        UnitState::default()
    };
    UNITS.lock().insert(String::from(name), state);
    true
}

/// Nexus ids handed out.
static NEXT_NEXUS: AtomicU64 = AtomicU64::new(1);

/// Status TASK SET FULL: the command was not taken for want of memory.
const TASK_SET_FULL: u8 = 0x28;

/// Most bios of one task out at once is bounded by the SCSI layer; a
/// cookie holds the slot in its high 16 bits and the layer's tag in the
/// low 16.
const TAG_BITS: u32 = 16;

/// The tag in the cookie of a task's [`Work::Save`] (its answer comes
/// through [`crate::session::Session::saved`], apart from the bios').
const SAVE_TAG: u64 = 0xffff;

/// One outstanding R2T.
#[derive(Clone, Copy, Debug)]
struct R2t {
    ttt: u32,
    offset: u32,
    len: u32,
    got: u32,
    data_sn: u32,
}

/// Where a task is.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Phase {
    /// Waiting for the service to admit its pages.
    Budget,
    /// Receiving its Data-Out.
    Data,
    /// Its bios are with the stack.
    Running,
}

/// One command.
struct Entry {
    itt: u32,
    lun_field: [u8; 8],
    export: Option<usize>,
    task: Option<scsi::Task>,
    phase: Phase,
    /// Expected Data-Out length (W bit), Data-In length (R bit).
    edtl_out: u32,
    edtl_in: u32,
    /// Bytes of Data-Out the task takes.
    want: u32,
    /// The command PDU (with its immediate data) is in.
    cmd_in: bool,
    /// No more unsolicited data will come.
    unsol_done: bool,
    /// End of the unsolicited data received so far.
    unsol_end: u32,
    unsol_data_sn: u32,
    /// Next offset to solicit.
    r2t_next: u32,
    r2t_sn: u32,
    r2ts: Vec<R2t>,
    /// Solicited bytes received.
    solicited: u64,
    bios_out: u32,
    held: u64,
    aborted: bool,
    /// The response was built (the entry waits only for its bios).
    answered: bool,
    /// Bytes a write asked for beyond what the initiator sends.
    overflow: u32,
    /// It holds its COMPARE AND WRITE range ([`atomic`]).
    locked: bool,
    /// It waits for another task's range: tried again later.
    blocked: bool,
    /// A write bio it made that waits for another task's range.
    held_bio: Option<(u32, Bio)>,
}

/// The session's commands, its sequence numbers and the LUNs it sees.
pub(super) struct Tasks {
    max: usize,
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    by_itt: BTreeMap<u32, u32>,
    /// Slot of the command whose header is being received.
    pub cur: Option<u32>,
    /// Slot waiting for budget.
    waiting: Option<u32>,
    exp_cmd_sn: u32,
    /// MaxCmdSN as last advertised.
    max_cmd_sn: u32,
    stat_sn: u32,
    next_ttt: u32,
    /// The target's IQN, its LUNs (LUN, export index) and their infos.
    target: String,
    luns: Vec<(u64, usize)>,
    lun_list: Vec<u64>,
    infos: Vec<ExportInfo>,
    seen_exports: usize,
    initiator: String,
    isid: [u8; 6],
    nexus: u64,
    bound: bool,
    held_total: u64,
    retries: VecDeque<(u64, Work)>,
}

impl Tasks {
    /// No command yet.
    pub fn new(max: usize) -> Tasks {
        Tasks {
            max: max.clamp(1, 1 << TAG_BITS),
            slots: Vec::new(),
            free: Vec::new(),
            by_itt: BTreeMap::new(),
            cur: None,
            waiting: None,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
            stat_sn: 1,
            next_ttt: 1,
            target: String::new(),
            luns: Vec::new(),
            lun_list: Vec::new(),
            infos: Vec::new(),
            seen_exports: 0,
            initiator: String::new(),
            isid: [0; 6],
            nexus: 0,
            bound: false,
            held_total: 0,
            retries: VecDeque::new(),
        }
    }

    /// The first login request's CmdSN starts the window.
    pub fn start_cmd_sn(&mut self, sn: u32) {
        self.exp_cmd_sn = sn;
        self.max_cmd_sn = sn;
    }

    /// StatSN, ExpCmdSN and MaxCmdSN for a PDU; `status`: the PDU takes a
    /// StatSN of its own (the counter advances).
    pub fn sn(&mut self, status: bool) -> Sn {
        let open = self.open() as u32;
        let room = (self.max as u32).saturating_sub(open).max(1);
        // The window never shrinks once advertised (RFC 7143 §4.2.2.1).
        let max = self.exp_cmd_sn.wrapping_add(room - 1);
        if pdu::sn_lt(self.max_cmd_sn, max) {
            self.max_cmd_sn = max;
        }
        let s = Sn {
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn,
        };
        if status {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        s
    }

    /// A non-immediate command's CmdSN: true if inside the window (it is
    /// taken and the window moves), false if it is to be ignored.
    pub fn take_cmd_sn(&mut self, sn: u32) -> bool {
        // The window as last advertised: beyond it, ignored.
        let max = self.max_cmd_sn;
        if pdu::sn_lt(sn, self.exp_cmd_sn) || pdu::sn_lt(max, sn) {
            log::debug!(
                "iscsi: CmdSN {sn} outside [{}, {max}], ignored",
                self.exp_cmd_sn
            );
            return false;
        }
        if pdu::sn_le(self.exp_cmd_sn, sn) {
            self.exp_cmd_sn = sn.wrapping_add(1);
        }
        true
    }

    /// Binds the session to its target's LUNs at the end of login.
    pub fn bind(
        &mut self,
        exports: &[ExportInfo],
        target: Option<&str>,
        initiator: &str,
        isid: [u8; 6],
    ) {
        self.target = String::from(target.unwrap_or(""));
        self.initiator = String::from(initiator);
        self.isid = isid;
        self.nexus = NEXT_NEXUS.fetch_add(1, Ordering::Relaxed);
        self.bound = target.is_some();
        self.seen_exports = usize::MAX;
        self.refresh(exports);
    }

    /// Picks up exports added since (a live config change adds LUNs).
    pub fn refresh(&mut self, exports: &[ExportInfo]) {
        if !self.bound || exports.len() == self.seen_exports {
            return;
        }
        self.seen_exports = exports.len();
        self.infos = exports.to_vec();
        let ts = super::login::targets(exports);
        self.luns = ts
            .iter()
            .find(|t| t.iqn == self.target)
            .map(|t| t.luns.clone())
            .unwrap_or_default();
        self.lun_list = self.luns.iter().map(|l| l.0).collect();
    }

    fn nexus(&self) -> Nexus<'_> {
        Nexus {
            initiator: &self.initiator,
            isid: self.isid,
            tpgt: 1,
            id: self.nexus,
        }
    }

    /// Runs `f` with the SCSI layer's view of `export` (None: no such
    /// LUN) and the nexus.
    fn with_unit<R>(
        &self,
        lun: u64,
        export: Option<usize>,
        f: impl FnOnce(&mut Unit<'_>, &Nexus<'_>) -> R,
    ) -> R {
        let info = export.and_then(|i| self.infos.get(i));
        let key = match info {
            Some(i) => i.name.clone(),
            None => alloc::format!("{}/{lun}", self.target),
        };
        let mut units = UNITS.lock();
        let state = units.entry(key).or_default();
        let mut unit = Unit {
            export: info,
            lun,
            target: &self.target,
            luns: &self.lun_list,
            state,
        };
        let nexus = self.nexus();
        f(&mut unit, &nexus)
    }

    /// Commands received and not yet answered.
    pub fn open(&self) -> usize {
        self.by_itt.len()
    }

    /// True with no command open.
    pub fn is_idle(&self) -> bool {
        self.slots.iter().all(|s| s.is_none())
    }

    /// True when no more command can be held.
    pub fn full(&self) -> bool {
        self.slots.iter().filter(|s| s.is_some()).count() >= self.max
    }

    /// Bios with the stack.
    pub fn bios_out(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .map(|e| e.bios_out as usize)
            .sum()
    }

    /// Payload bytes held by tasks.
    pub fn held_bytes(&self) -> u64 {
        self.held_total
    }

    /// A command waits for budget.
    pub fn waiting_budget(&self) -> bool {
        self.waiting.is_some()
    }

    /// Bytes the waiting command asks for.
    pub fn wanted(&self) -> Option<u64> {
        let e = self.entry(self.waiting?)?;
        e.task.as_ref().map(|t| t.pages_wanted())
    }

    /// Admits the waiting command: allocates its pages.
    pub fn grant(&mut self) -> bool {
        let Some(slot) = self.waiting else {
            return true;
        };
        if !self.alloc(slot) {
            return false;
        }
        self.waiting = None;
        true
    }

    fn alloc(&mut self, slot: u32) -> bool {
        let Some(e) = self.entry_mut(slot) else {
            return true;
        };
        let Some(t) = e.task.as_mut() else {
            return true;
        };
        let n = t.pages_wanted();
        if t.alloc().is_err() {
            return false;
        }
        e.held = n;
        e.phase = Phase::Data;
        self.held_total += n;
        true
    }

    /// The name of the export a LUN maps to (the unit's key).
    fn lu_name(&self, export: Option<usize>) -> Option<&str> {
        Some(self.infos.get(export?)?.name.as_str())
    }

    /// Slots of tasks waiting for another task's range.
    fn blocked(&self) -> Vec<u32> {
        if !self.slots.iter().flatten().any(|e| e.blocked) {
            return Vec::new();
        }
        (0..self.slots.len() as u32)
            .filter(|&s| self.entry(s).is_some_and(|e| e.blocked))
            .collect()
    }

    fn entry(&self, slot: u32) -> Option<&Entry> {
        self.slots.get(slot as usize)?.as_ref()
    }

    fn entry_mut(&mut self, slot: u32) -> Option<&mut Entry> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    fn insert(&mut self, e: Entry) -> u32 {
        let itt = e.itt;
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(e);
                s
            }
            None => {
                self.slots.push(Some(e));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_itt.insert(itt, slot);
        slot
    }

    fn remove(&mut self, slot: u32) {
        if let Some(e) = self.slots.get_mut(slot as usize).and_then(Option::take) {
            if e.locked {
                if let Some(lu) = self.lu_name(e.export) {
                    atomic::unlock(lu, (self.nexus, slot));
                }
            }
            if self.by_itt.get(&e.itt) == Some(&slot) {
                self.by_itt.remove(&e.itt);
            }
            self.held_total -= e.held.min(self.held_total);
            if self.waiting == Some(slot) {
                self.waiting = None;
            }
            if self.cur == Some(slot) {
                self.cur = None;
            }
            self.free.push(slot);
        }
    }

    /// Copies bytes that came through `recv` into the task's pages.
    pub fn place(&mut self, slot: u32, at: u64, bytes: &[u8], counters: &DataCounters) {
        let Some(sg) = self
            .entry(slot)
            .and_then(|e| e.task.as_ref())
            .and_then(|t| t.data_out_sg())
        else {
            return;
        };
        if at + bytes.len() as u64 <= sg.len_bytes() {
            let _ = sg.copy_from_slice(at, bytes, counters);
        }
    }

    /// The task's pages for `len` bytes of Data-Out from `at`.
    pub fn pieces<'a>(&'a self, slot: u32, at: u64, len: u64, out: &mut RxPieces<'a>) -> usize {
        let Some(sg) = self
            .entry(slot)
            .and_then(|e| e.task.as_ref())
            .and_then(|t| t.data_out_sg())
        else {
            return 0;
        };
        let end = (at + len).min(sg.len_bytes());
        let mut pos = 0u64;
        let mut n = 0usize;
        for r in sg.iter() {
            let rl = u64::from(r.len);
            let (a, b) = (pos, pos + rl);
            pos = b;
            if b <= at {
                continue;
            }
            if a >= end || out.is_full() {
                break;
            }
            let from = at.max(a) - a;
            let to = end.min(b) - a;
            out.push(PageSlice {
                page: &r.page,
                offset: r.offset as usize + from as usize,
                len: (to - from) as usize,
            });
            n += (to - from) as usize;
        }
        n
    }

    /// Aborts every command: their bios still come back, their answers
    /// are dropped.
    pub fn abort_all(&mut self) {
        let slots: Vec<u32> = (0..self.slots.len() as u32).collect();
        for s in slots {
            self.abort(s);
        }
    }

    /// Aborts one command.
    fn abort(&mut self, slot: u32) {
        let Some(e) = self.entry_mut(slot) else {
            return;
        };
        e.aborted = true;
        if e.bios_out == 0 {
            self.remove(slot);
        }
    }

    /// The peer closed its side: commands still receiving data are
    /// dropped, the others are answered.
    pub fn input_closed(&mut self) {
        let slots: Vec<u32> = (0..self.slots.len() as u32).collect();
        for s in slots {
            if self.entry(s).is_some_and(|e| e.phase != Phase::Running) {
                self.abort(s);
            }
        }
    }

    /// Pages of sent Data-In are given back.
    pub fn sent(&mut self, tx: &mut TxQueue) {
        let _ = tx;
    }

    /// Bios refused for want of memory go again when their time comes.
    pub fn retry(&mut self, now_ms: u64, work: &mut VecDeque<Work>) {
        while self.retries.front().is_some_and(|(t, _)| *t <= now_ms) {
            if let Some((_, w)) = self.retries.pop_front() {
                work.push_back(w);
            }
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        atomic::forget(self.nexus);
    }
}

impl Connection {
    /// A SCSI Command's header is in: checks it, makes its task, and says
    /// where its immediate data goes.
    pub(super) fn command_header(&mut self) -> Sink {
        let bhs = self.bhs;
        self.tasks.cur = None;
        if self.login.discovery {
            return Sink::Drop;
        }
        if !bhs.immediate() && !self.tasks.take_cmd_sn(bhs.cmd_sn()) {
            return Sink::Drop;
        }
        // A tag in use, or the reserved one: rejected once its data is in.
        if self.tasks.by_itt.contains_key(&bhs.itt()) || bhs.itt() == NO_TAG {
            return Sink::Drop;
        }
        let flags = bhs.flags();
        let (read, write) = (flags & 0x40 != 0, flags & 0x20 != 0);
        let edtl = bhs.u32_at(20);
        // The CDB: 16 bytes in the BHS, more in an extended CDB AHS.
        let mut cdb: Vec<u8> = bhs.0[32..48].to_vec();
        let ahs = &self.hdr[BHS_LEN..BHS_LEN + bhs.ahs_len()];
        let mut i = 0;
        while i + 4 <= ahs.len() {
            let len = usize::from(pdu::be16(ahs, i));
            let ty = ahs[i + 2];
            let end = (i + 3 + len).min(ahs.len());
            if ty == 1 && len > 1 {
                cdb.extend_from_slice(&ahs[i + 4..end]);
            }
            i += (3 + len).div_ceil(4) * 4;
        }
        let lun = bhs.lun();
        let export = lun.and_then(|l| self.tasks.luns.iter().find(|x| x.0 == l).map(|x| x.1));
        // A write asking for more than the initiator will send is carried
        // out for the whole blocks it sends (FCP-4's choice (a), which
        // libiscsi's residual tests take), with an overflow residual.
        let bs = export
            .and_then(|i| self.tasks.infos.get(i))
            .map_or(512, |i| i.min_block.max(512));
        let mut overflow = 0u32;
        if write {
            if let Some((short, over)) = truncate_write(&cdb, edtl, bs) {
                cdb = short;
                overflow = over;
            }
        }
        let cmd = Command {
            cdb: &cdb,
            data_out_len: if write { edtl } else { 0 },
            data_in_len: if read { edtl } else { 0 },
        };
        let lun_no = lun.unwrap_or(u64::MAX);
        let task = self.tasks.with_unit(lun_no, export, |unit, nexus| {
            scsi::Task::new(&cmd, unit, nexus)
        });
        let want = task.data_out_want();
        let pages = task.pages_wanted();
        let e = Entry {
            itt: bhs.itt(),
            lun_field: bhs.lun_field(),
            export,
            task: Some(task),
            phase: Phase::Budget,
            edtl_out: if write { edtl } else { 0 },
            edtl_in: if read { edtl } else { 0 },
            want,
            cmd_in: false,
            unsol_done: false,
            unsol_end: 0,
            unsol_data_sn: 0,
            r2t_next: 0,
            r2t_sn: 0,
            r2ts: Vec::new(),
            solicited: 0,
            bios_out: 0,
            held: 0,
            aborted: false,
            answered: false,
            overflow,
            locked: false,
            blocked: false,
            held_bio: None,
        };
        let slot = self.tasks.insert(e);
        if self.stopping {
            // The server is stopping: new commands are not started (the
            // initiator retries BUSY elsewhere or later).
            self.fail_task(slot, scsi::BUSY);
            return Sink::Drop;
        }
        self.tasks.cur = Some(slot);
        if pages > 0 && self.cfg.budgeted {
            self.tasks.waiting = Some(slot);
            return Sink::Drop;
        }
        if !self.tasks.alloc(slot) {
            self.fail_task(slot, TASK_SET_FULL);
            return Sink::Drop;
        }
        self.immediate_sink(slot)
    }

    /// Where the immediate data of the command in `slot` goes.
    fn immediate_sink(&self, slot: u32) -> Sink {
        let Some(e) = self.tasks.entry(slot) else {
            return Sink::Drop;
        };
        if e.want == 0 || e.task.as_ref().is_none_or(|t| t.data_out_sg().is_none()) {
            return Sink::Drop;
        }
        Sink::Task {
            slot,
            at: 0,
            len: e.want,
        }
    }

    /// The service admitted the waiting command: its data can come in.
    pub(super) fn after_grant(&mut self) {
        let Some(slot) = self.tasks.cur else {
            return;
        };
        let Some(e) = self.tasks.entry(slot) else {
            return;
        };
        if e.phase == Phase::Budget {
            return;
        }
        if e.cmd_in {
            self.advance(slot);
        } else if matches!(self.rx, super::Rx::Data { done: 0, .. }) {
            self.sink = self.immediate_sink(slot);
        }
    }

    /// The command PDU and its immediate data are in.
    pub(super) fn command_data_done(&mut self) {
        let bhs = self.bhs;
        let Some(slot) = self.tasks.cur.take() else {
            if self.login.discovery {
                self.reject(&bhs, pdu::reject::PROTOCOL);
            } else if self.tasks.by_itt.contains_key(&bhs.itt()) || bhs.itt() == NO_TAG {
                self.reject(&bhs, pdu::reject::INVALID_FIELD);
            }
            return;
        };
        let imm = bhs.data_len() as u32;
        let final_bit = bhs.final_bit();
        let initial_r2t = self.params.initial_r2t;
        let Some(e) = self.tasks.entry_mut(slot) else {
            return;
        };
        e.cmd_in = true;
        e.unsol_end = imm;
        // F: no unsolicited Data-Out follows (nor may it with InitialR2T).
        e.unsol_done = final_bit || initial_r2t || imm >= e.edtl_out;
        e.r2t_next = imm;
        let phase = e.phase;
        if phase == Phase::Budget {
            self.tasks.cur = Some(slot);
            return;
        }
        self.advance(slot);
    }

    /// A Data-Out header is in: checks it against its task, and says where
    /// its data goes.
    pub(super) fn data_out_header(&mut self) -> Sink {
        let bhs = self.bhs;
        let Some(&slot) = self.tasks.by_itt.get(&bhs.itt()) else {
            return Sink::Drop;
        };
        let ttt = bhs.u32_at(20);
        let data_sn = bhs.u32_at(36);
        let offset = bhs.u32_at(40);
        let len = bhs.data_len() as u32;
        let Some(e) = self.tasks.entry_mut(slot) else {
            return Sink::Drop;
        };
        let end = offset.checked_add(len);
        let ok = match end {
            Some(end) if end <= e.edtl_out => {
                if ttt == NO_TAG {
                    let ok = !e.unsol_done && offset == e.unsol_end && data_sn == e.unsol_data_sn;
                    e.unsol_data_sn = e.unsol_data_sn.wrapping_add(1);
                    ok
                } else {
                    match e.r2ts.iter_mut().find(|r| r.ttt == ttt) {
                        Some(r) => {
                            let ok = offset == r.offset + r.got
                                && end <= r.offset + r.len
                                && data_sn == r.data_sn;
                            r.data_sn = r.data_sn.wrapping_add(1);
                            ok
                        }
                        None => false,
                    }
                }
            }
            _ => false,
        };
        if !ok {
            log::info!(
                "iscsi: Data-Out for ITT {:#x} out of sequence, rejected",
                bhs.itt()
            );
            self.tasks.cur = None;
            self.bad_data_out = true;
            return Sink::Drop;
        }
        self.bad_data_out = false;
        let want = e.want;
        if offset >= want
            || e.task.as_ref().is_none_or(|t| t.data_out_sg().is_none())
            || e.phase != Phase::Data
        {
            return Sink::Drop;
        }
        Sink::Task {
            slot,
            at: offset,
            len: (want - offset).min(len),
        }
    }

    /// A Data-Out PDU is in.
    pub(super) fn data_out_done(&mut self) {
        let bhs = self.bhs;
        if self.bad_data_out {
            self.bad_data_out = false;
            self.reject(&bhs, pdu::reject::PROTOCOL);
            return;
        }
        let Some(&slot) = self.tasks.by_itt.get(&bhs.itt()) else {
            return;
        };
        let ttt = bhs.u32_at(20);
        let offset = bhs.u32_at(40);
        let len = bhs.data_len() as u32;
        let fin = bhs.final_bit();
        let Some(e) = self.tasks.entry_mut(slot) else {
            return;
        };
        if ttt == NO_TAG {
            e.unsol_end = offset + len;
            e.r2t_next = e.r2t_next.max(e.unsol_end);
            if fin {
                e.unsol_done = true;
            }
        } else if let Some(i) = e.r2ts.iter().position(|r| r.ttt == ttt) {
            e.r2ts[i].got += len;
            e.solicited += u64::from(len);
            if e.r2ts[i].got >= e.r2ts[i].len {
                e.r2ts.remove(i);
            }
        }
        self.advance(slot);
    }

    /// Moves a task on: more R2Ts, the end of its Data-Out, its bios, its
    /// answer.
    fn advance(&mut self, slot: u32) {
        let max_r2t = self.params.max_outstanding_r2t.max(1) as usize;
        let burst = self.params.max_burst.max(512);
        let first_ttt = self.tasks.next_ttt;
        let Some(e) = self.tasks.entry_mut(slot) else {
            return;
        };
        if e.phase == Phase::Data {
            if !e.unsol_done || !e.cmd_in {
                return;
            }
            // Solicit what the task takes beyond the unsolicited data.
            let mut r2ts = Vec::new();
            let mut ttt = first_ttt;
            while e.r2ts.len() < max_r2t && e.r2t_next < e.want {
                let len = (e.want - e.r2t_next).min(burst);
                let r = R2t {
                    ttt,
                    offset: e.r2t_next,
                    len,
                    got: 0,
                    data_sn: 0,
                };
                ttt = ttt.wrapping_add(1);
                if ttt == NO_TAG || ttt == 0 {
                    ttt = 1;
                }
                e.r2ts.push(r);
                e.r2t_next += len;
                r2ts.push((r, e.r2t_sn, e.itt, e.lun_field));
                e.r2t_sn = e.r2t_sn.wrapping_add(1);
            }
            self.tasks.next_ttt = ttt;
            for (r, sn, itt, lun) in r2ts {
                let mut h = pdu::header(op::R2T, 0x80);
                h[8..16].copy_from_slice(&lun);
                pdu::put32(&mut h, 16, itt);
                pdu::put32(&mut h, 20, r.ttt);
                let s = self.tasks.sn(false);
                s.put(&mut h);
                pdu::put32(&mut h, 36, sn);
                pdu::put32(&mut h, 40, r.offset);
                pdu::put32(&mut h, 44, r.len);
                self.queue_pdu(h, Vec::new());
            }
            let Some(e) = self.tasks.entry_mut(slot) else {
                return;
            };
            let have = u64::from(e.unsol_end.min(e.want)) + e.solicited;
            if have < u64::from(e.want) || !e.r2ts.is_empty() {
                return;
            }
            e.phase = Phase::Running;
            if e.want > 0 {
                let (lun, export) = (decode(&e.lun_field), e.export);
                let mut t = e.task.take();
                if let Some(t) = t.as_mut() {
                    self.tasks
                        .with_unit(lun, export, |u, n| t.data_out_done(u, n));
                }
                if let Some(e) = self.tasks.entry_mut(slot) {
                    e.task = t;
                }
            }
        }
        self.pump(slot);
    }

    /// Hands the task's bios to the service; answers it once done. A
    /// COMPARE AND WRITE takes its range first, and a write waits for a
    /// range another task holds ([`atomic`]): the task is blocked, and
    /// tried again later.
    fn pump(&mut self, slot: u32) {
        let owner = (self.tasks.nexus, slot);
        loop {
            let Some(e) = self.tasks.entry_mut(slot) else {
                return;
            };
            if e.phase != Phase::Running || e.answered || e.aborted {
                return;
            }
            e.blocked = false;
            let (lun, export) = (decode(&e.lun_field), e.export);
            if let Some(state) = e.task.as_mut().and_then(|t| t.take_save()) {
                e.bios_out += 1;
                let cookie = (u64::from(slot) << TAG_BITS) | SAVE_TAG;
                match export {
                    Some(export) => self.work.push_back(Work::Save {
                        export,
                        state,
                        cookie,
                    }),
                    None => self.save_done(cookie, Err(BioError::Orphaned)),
                }
                continue;
            }
            let range = e.task.as_ref().and_then(|t| t.atomic_range());
            if let (false, Some((off, len))) = (e.locked, range) {
                let got = self
                    .tasks
                    .lu_name(export)
                    .is_none_or(|lu| atomic::lock(lu, owner, off, len));
                let Some(e) = self.tasks.entry_mut(slot) else {
                    return;
                };
                e.blocked = !got;
                e.locked = got;
                if !got {
                    return;
                }
            }
            let Some(e) = self.tasks.entry_mut(slot) else {
                return;
            };
            let next = match e.held_bio.take() {
                Some(b) => Some(b),
                None => {
                    let mut t = e.task.take();
                    let next = t
                        .as_mut()
                        .and_then(|t| self.tasks.with_unit(lun, export, |u, _| t.next_bio(u)));
                    if let Some(e) = self.tasks.entry_mut(slot) {
                        e.task = t;
                    }
                    next
                }
            };
            let Some((tag, bio)) = next else {
                let Some(e) = self.tasks.entry(slot) else {
                    return;
                };
                let done = e.task.as_ref().is_none_or(|t| t.is_done());
                if done && e.bios_out == 0 {
                    self.finish(slot);
                }
                return;
            };
            let cookie = (u64::from(slot) << TAG_BITS) | u64::from(tag & 0xffff);
            let go = !changes_medium(bio.cmd)
                || self.tasks.lu_name(export).is_none_or(|lu| {
                    atomic::start_write(lu, owner, cookie, bio.offset, bio.length)
                });
            let Some(e) = self.tasks.entry_mut(slot) else {
                return;
            };
            if !go {
                e.held_bio = Some((tag, bio));
                e.blocked = true;
                return;
            }
            e.bios_out += 1;
            match export {
                Some(export) => self.work.push_back(Work::Io {
                    export,
                    bio,
                    cookie,
                }),
                None => self.bio_done(cookie, bio, Err(BioError::Orphaned)),
            }
        }
    }

    /// Something a task sent out came back: its slot, if the task still
    /// wants the answer (an aborted task is freed once all is back).
    fn came_back(&mut self, cookie: u64) -> Option<u32> {
        let slot = (cookie >> TAG_BITS) as u32;
        let export = self.tasks.entry(slot)?.export;
        if let Some(lu) = self.tasks.lu_name(export) {
            atomic::write_done(lu, self.tasks.nexus, cookie);
        }
        let e = self.tasks.entry_mut(slot)?;
        e.bios_out = e.bios_out.saturating_sub(1);
        if e.aborted {
            if e.bios_out == 0 {
                self.tasks.remove(slot);
            }
            return None;
        }
        Some(slot)
    }

    /// Tries again the tasks that wait for another task's range.
    pub(super) fn unblock(&mut self) {
        for slot in self.tasks.blocked() {
            self.pump(slot);
        }
    }

    /// A bio came back.
    pub(super) fn bio_done(&mut self, cookie: u64, bio: Bio, result: BioResult) {
        let Some(slot) = self.came_back(cookie) else {
            return;
        };
        let tag = (cookie & 0xffff) as u32;
        let Some(e) = self.tasks.entry_mut(slot) else {
            return;
        };
        let (lun, export) = (decode(&e.lun_field), e.export);
        let mut t = e.task.take();
        if let Some(t) = t.as_mut() {
            self.tasks
                .with_unit(lun, export, |u, _| t.complete(u, tag, bio, result));
        }
        if let Some(e) = self.tasks.entry_mut(slot) {
            e.task = t;
        }
        self.pump(slot);
        self.unblock();
    }

    /// A [`Work::Save`] came back.
    pub(super) fn save_done(&mut self, cookie: u64, result: BioResult) {
        let Some(slot) = self.came_back(cookie) else {
            return;
        };
        if let Some(t) = self.tasks.entry_mut(slot).and_then(|e| e.task.as_mut()) {
            t.saved(result);
        }
        self.pump(slot);
    }

    /// Answers a task with `status` and no sense, without the SCSI layer.
    fn fail_task(&mut self, slot: u32, status: u8) {
        if let Some(e) = self.tasks.entry_mut(slot) {
            e.task = None;
            e.want = 0;
            e.phase = Phase::Running;
            e.answered = true;
            let (itt, lun) = (e.itt, e.lun_field);
            let r = Response {
                status,
                sense: Vec::new(),
                data_in: DataIn::None,
            };
            self.respond(itt, lun, 0, 0, 0, 0, r);
            // Data-Out still coming for it finds no task and is dropped.
            self.tasks.remove(slot);
        }
    }

    /// The task is done: its Data-In and status go out, it is freed.
    fn finish(&mut self, slot: u32) {
        let Some(e) = self.tasks.entry_mut(slot) else {
            return;
        };
        let Some(t) = e.task.take() else {
            return self.tasks.remove(slot);
        };
        let r = t.response();
        let (itt, lun, edtl_in, edtl_out, want) =
            (e.itt, e.lun_field, e.edtl_in, e.edtl_out, e.want);
        let overflow = e.overflow;
        if !e.aborted {
            self.respond(itt, lun, edtl_in, edtl_out, want, overflow, r);
        }
        self.tasks.remove(slot);
    }

    /// Data-In PDUs and the status of a command.
    #[allow(clippy::too_many_arguments, reason = "one command's transfer facts")]
    fn respond(
        &mut self,
        itt: u32,
        lun: [u8; 8],
        edtl_in: u32,
        edtl_out: u32,
        want: u32,
        overflow: u32,
        r: Response,
    ) {
        let good = r.status == scsi::GOOD || r.status == scsi::CONDITION_MET;
        let data_len = match &r.data_in {
            DataIn::None => 0u64,
            DataIn::Bytes(b) => b.len() as u64,
            DataIn::Pages(sg) => sg.len_bytes(),
        };
        // Residuals (RFC 7143 §11.4.5): what the command would move
        // against what the initiator expected.
        let (expected, moved) = if edtl_in > 0 || (edtl_out == 0 && data_len > 0) {
            (u64::from(edtl_in), data_len)
        } else {
            (u64::from(edtl_out), u64::from(want))
        };
        let (rflags, residual) = if overflow > 0 {
            (0x04u8, overflow)
        } else if moved > expected {
            (0x04u8, (moved - expected).min(u64::from(u32::MAX)) as u32)
        } else if moved < expected {
            (0x02u8, (expected - moved) as u32)
        } else {
            (0, 0)
        };
        let send = if good {
            data_len.min(u64::from(edtl_in))
        } else {
            0
        };
        if send > 0 {
            let seg = u64::from(self.params.send_segment.max(512));
            let burst = u64::from(self.params.max_burst.max(512));
            let mut off = 0u64;
            let mut data_sn = 0u32;
            while off < send {
                let n = seg.min(send - off).min(burst - off % burst);
                let last = off + n == send;
                let end_of_burst = (off + n).is_multiple_of(burst);
                let mut flags = 0u8;
                if last || end_of_burst {
                    flags |= 0x80;
                }
                let with_status = last && r.sense.is_empty();
                if with_status {
                    flags |= 0x01 | rflags;
                }
                let mut h = pdu::header(op::DATA_IN, flags);
                if with_status {
                    h[3] = r.status;
                }
                h[8..16].copy_from_slice(&lun);
                pdu::put32(&mut h, 16, itt);
                pdu::put32(&mut h, 20, NO_TAG);
                let s = self.tasks.sn(with_status);
                if with_status {
                    s.put(&mut h);
                } else {
                    pdu::put32(&mut h, 28, s.exp_cmd_sn);
                    pdu::put32(&mut h, 32, s.max_cmd_sn);
                }
                pdu::put32(&mut h, 36, data_sn);
                pdu::put32(&mut h, 40, off as u32);
                if with_status {
                    pdu::put32(&mut h, 44, residual);
                }
                pdu::set_data_len(&mut h, n as usize);
                let (hd, dd) = self.digests();
                match &r.data_in {
                    DataIn::Bytes(b) => {
                        let d = b[off as usize..(off + n) as usize].to_vec();
                        self.tx.push_bytes(h, d, hd, dd);
                    }
                    DataIn::Pages(sg) => {
                        self.tx
                            .push_pages(h, sg.slice(off, n), hd, dd, &self.counters);
                    }
                    DataIn::None => {}
                }
                off += n;
                data_sn += 1;
                if with_status {
                    return;
                }
            }
        }
        let mut h = pdu::header(op::SCSI_RSP, 0x80 | rflags);
        h[2] = 0;
        h[3] = r.status;
        pdu::put32(&mut h, 16, itt);
        pdu::put32(&mut h, 44, residual);
        let mut data = Vec::new();
        if !r.sense.is_empty() {
            data.extend_from_slice(&(r.sense.len() as u16).to_be_bytes());
            data.extend_from_slice(&r.sense);
        }
        let _ = lun;
        self.send_status(h, data);
    }

    /// A Task Management Function Request (RFC 7143 §11.5).
    pub(super) fn tmf_request(&mut self, exports: &[ExportInfo], bhs: &Bhs) {
        let _ = exports;
        if !bhs.immediate() && !self.tasks.take_cmd_sn(bhs.cmd_sn()) {
            return;
        }
        let function = bhs.flags() & 0x7f;
        let lun = bhs.lun();
        let export = lun.and_then(|l| self.tasks.luns.iter().find(|x| x.0 == l).map(|x| x.1));
        let on_lun = |e: &Entry| Some(decode(&e.lun_field)) == lun;
        let mut cold = false;
        let response: u8 = match function {
            // ABORT TASK
            1 => {
                let rtt = bhs.u32_at(20);
                let ref_sn = bhs.u32_at(32);
                match self.tasks.by_itt.get(&rtt).copied() {
                    Some(slot) if self.tasks.entry(slot).is_some_and(&on_lun) => {
                        self.tasks.abort(slot);
                        0
                    }
                    Some(_) => 1,
                    // Answered already (its CmdSN is behind the window), or
                    // never seen.
                    None if pdu::sn_lt(ref_sn, self.tasks.exp_cmd_sn) => 0,
                    None => 1,
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
            2 | 4 | 5 => {
                if export.is_none() {
                    2
                } else {
                    let slots: Vec<u32> = (0..self.tasks.slots.len() as u32)
                        .filter(|&s| {
                            self.tasks
                                .entry(s)
                                .is_some_and(|e| on_lun(e) && e.itt != bhs.itt())
                        })
                        .collect();
                    for s in slots {
                        self.tasks.abort(s);
                    }
                    if function == 5 {
                        let l = lun.unwrap_or(0);
                        self.tasks.with_unit(l, export, |u, n| u.state.lun_reset(n));
                    }
                    0
                }
            }
            // TARGET WARM RESET, TARGET COLD RESET
            6 | 7 => {
                self.tasks.abort_all();
                let luns = self.tasks.luns.clone();
                for (l, e) in luns {
                    self.tasks
                        .with_unit(l, Some(e), |u, n| u.state.target_reset(n));
                }
                cold = function == 7;
                0
            }
            // TASK REASSIGN: allegiance reassignment is not supported at
            // ErrorRecoveryLevel 0.
            8 => 4,
            _ => 5,
        };
        let mut h = pdu::header(op::TMF_RSP, 0x80);
        h[2] = response;
        pdu::put32(&mut h, 16, bhs.itt());
        self.send_status(h, Vec::new());
        if cold {
            self.close(Close::Soft);
        }
    }

    /// The session ends: the units forget its nexus.
    pub(super) fn session_gone(&mut self) {
        if !self.tasks.bound {
            return;
        }
        let luns = self.tasks.luns.clone();
        for (l, e) in luns {
            self.tasks
                .with_unit(l, Some(e), |u, n| u.state.nexus_gone(n));
        }
        self.tasks.bound = false;
    }
}

/// Bios that change the medium, which a COMPARE AND WRITE's range holds
/// off.
fn changes_medium(cmd: geom::bio::BioCmd) -> bool {
    use geom::bio::BioCmd;
    matches!(cmd, BioCmd::Write | BioCmd::Discard | BioCmd::WriteZeroes)
}

/// A write CDB whose transfer length in blocks of `bs` is more than the
/// `edtl` bytes the initiator sends: the CDB cut to the whole blocks sent,
/// and the overflow in bytes. `None` when the write fits, or is not a
/// write this applies to.
fn truncate_write(cdb: &[u8], edtl: u32, bs: u32) -> Option<(Vec<u8>, u32)> {
    // (opcode, offset and width of the transfer length)
    let (at, width) = match *cdb.first()? {
        0x2a | 0x2e => (7, 2),
        0xaa | 0xae => (6, 4),
        0x8a | 0x8e => (10, 4),
        _ => return None,
    };
    let field = cdb.get(at..at + width)?;
    let blocks = field.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b));
    let spdtl = blocks.checked_mul(u64::from(bs))?;
    if spdtl <= u64::from(edtl) {
        return None;
    }
    let over = u32::try_from(spdtl - u64::from(edtl)).ok()?;
    let fit = u64::from(edtl / bs);
    let mut short = cdb.to_vec();
    for i in 0..width {
        short[at + i] = (fit >> (8 * (width - 1 - i))) as u8;
    }
    Some((short, over))
}

/// The LUN of a LUN field (`u64::MAX` for one that does not decode).
fn decode(l: &[u8; 8]) -> u64 {
    pdu::decode_lun(l).unwrap_or(u64::MAX)
}
