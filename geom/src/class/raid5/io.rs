//! Regular requests: reads routed to members, writes cut into row
//! operations (planned, computed, logged, written), flushes, and what a
//! failing member does to them.

use super::layout::{combine, page_list, Mix, Piece, Source, COLUMN};
use super::ppl::{self, Entry};
use super::{
    cookie, plan16, DirectRead, FlushRound, Kind, MemberState, OpKind, Parent, Phase, Raid5Geom, RowOp,
};
use crate::bio::{Bio, BioCmd, BioError, BioResult};
use crate::page::{Page, SgList, PAGE_SIZE};
use crate::stack::Io;
use core::hash::Hasher;
use alloc::vec;
use alloc::vec::Vec;
use bufcache::{Lookup, Ready, Tag};

/// How a row's new parity is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// Read old data being replaced and old parity.
    ReadModify,
    /// Read the data not being replaced.
    Reconstruct,
    /// A data member is missing: read the whole row and rebuild its chunk.
    Degraded,
    /// The parity member is missing: write data only.
    NoParity,
}

impl Raid5Geom {
    /// A new client request.
    pub(super) fn start_request(&mut self, io: &mut Io<'_>, bio: Bio) {
        match bio.cmd {
            BioCmd::Flush => self.start_flush(io, Some(bio), false),
            BioCmd::GetAllocation => io.deliver(bio, Ok(())),
            BioCmd::Read => self.start_read(io, bio),
            BioCmd::Write | BioCmd::Discard | BioCmd::WriteZeroes => self.start_write(io, bio),
        }
    }

    fn new_parent(&mut self, bio: Bio) -> u32 {
        self.parents.insert(Parent {
            bio,
            pending: 1,
            result: Ok(()),
            zeroes: None,
            fills: Vec::new(),
        })
    }

    /// One piece of a parent is done.
    pub(super) fn piece_done(&mut self, io: &mut Io<'_>, parent: u32, result: BioResult) {
        let Some(p) = self.parents.get_mut(parent) else {
            return;
        };
        if p.result.is_ok() {
            p.result = result;
        }


        p.pending -= 1;
        if p.pending > 0 {
            return;
        }
        // Rebuilt pieces go into the caller's pages once no child holds
        // them at a device.
        if p.result.is_ok() && !p.fills.is_empty() {
            let counters = &io.stats(self.provider).data;
            for (at, fill) in core::mem::take(&mut p.fills) {
                let r = p.bio.sg.map_range(at, fill.len_bytes(), counters, |off, dst| {
                    let _ = fill.copy_to_slice(off, dst, counters);
                });
                if r.is_err() {
                    p.result = Err(BioError::Io);
                }
            }
        }
        let held = p.bio.cmd.is_write() || p.bio.cmd == BioCmd::Flush;
        if held && p.result.is_ok() && !self.barrier_passed() {
            self.parked.push_back(parent);
            return;
        }
        if let Some(p) = self.parents.remove(parent) {
            io.deliver(p.bio, p.result);
        }
    }

    /// True when every present member's record holds the barrier version.
    pub(super) fn barrier_passed(&self) -> bool {
        (0..self.members.len())
            .filter(|&m| self.present(m))
            .all(|m| self.members[m].meta_durable >= self.barrier)
            || !self.labelled
    }

    /// Delivers writes parked behind the barrier once it has passed.
    pub(super) fn release_parked(&mut self, io: &mut Io<'_>) -> bool {
        if self.parked.is_empty() || !self.barrier_passed() {
            return false;
        }
        while let Some(p) = self.parked.pop_front() {
            if let Some(p) = self.parents.remove(p) {
                io.deliver(p.bio, p.result);
            }
        }
        true
    }

    fn start_read(&mut self, io: &mut Io<'_>, bio: Bio) {
        let (offset, len) = (bio.offset, bio.length);
        let parent = self.new_parent(bio);
        let pieces: Vec<Piece> = self.layout.pieces(offset, len).collect();
        self.route_reads(io, parent, &pieces);
        self.piece_done(io, parent, Ok(()));
    }

    /// Reads pieces from their members, one child per run of pieces
    /// contiguous on a member; pieces on a member that cannot serve their
    /// row are rebuilt from the row instead.
    fn route_reads(&mut self, io: &mut Io<'_>, parent: u32, pieces: &[Piece]) {
        let n = self.members.len();
        // Per member: the run being gathered (offset on the member, length,
        // pages, pieces); runs end where the member's offsets do not follow.
        #[allow(clippy::type_complexity)]
        let mut runs: Vec<Option<(u64, u64, SgList, Vec<Piece>)>> = (0..n).map(|_| None).collect();
        let mut out: Vec<(usize, u64, u64, SgList, Vec<Piece>)> = Vec::new();
        let Some(sg) = self.parents.get(parent).map(|p| p.bio.sg.clone()) else {
            return;
        };
        for p in pieces {
            if !self.available(p.member, p.row) {
                self.start_rebuilt_read(io, parent, p);
                continue;
            }
            let on = self.layout.row_offset(p.row) + p.within;
            let run = &mut runs[p.member];
            match run {
                Some((s, l, pages, ps)) if *s + *l == on => {
                    *l += p.len;
                    pages.append(&sg.slice(p.at, p.len));
                    ps.push(*p);
                }
                _ => {
                    if let Some((s, l, pages, ps)) = run.take() {
                        out.push((p.member, s, l, pages, ps));
                    }
                    *run = Some((on, p.len, sg.slice(p.at, p.len), vec![*p]));
                }
            }
        }
        for (m, run) in runs.into_iter().enumerate() {
            if let Some((s, l, pages, ps)) = run {
                out.push((m, s, l, pages, ps));
            }
        }
        for (m, s, l, pages, ps) in out {
            let Some(par) = self.parents.get_mut(parent) else {
                return;
            };
            par.pending += 1;
            let child = par.bio.child(s, l, pages);
            let id = self.reads.insert(DirectRead {
                parent,
                member: m,
                pieces: ps,
            });
            if !self.send(io, m, child, cookie(Kind::Direct, m, 0, id)) {
                self.reads.remove(id);
                self.piece_done(io, parent, Err(BioError::Io));
            }
        }
    }

    /// A direct read came back; a failed one fails its member and is
    /// served again from the rest of the row.
    pub(super) fn direct_done(&mut self, io: &mut Io<'_>, id: u32, result: BioResult) {
        let Some(r) = self.reads.remove(id) else {
            return;
        };
        if result.is_err() && result != Err(BioError::NoMemory) {
            // Served from the rest of the row instead. A read error alone
            // does not drop the member (md's way: the disk may be fine
            // elsewhere); a member whose provider is gone, or whose disk
            // gave up after its errors in a row, leaves.
            if result != Err(BioError::Io) {
                self.fail_member(io, r.member, "read error");
            }
            if let Some(par) = self.parents.get_mut(r.parent) {
                par.pending += r.pieces.len() as u32;
            }
            for p in &r.pieces {
                if self.available(p.member, p.row) {
                    self.start_rebuilt_read(io, r.parent, p);
                    self.piece_done(io, r.parent, Ok(()));
                } else {
                    self.route_reads(io, r.parent, core::slice::from_ref(p));
                    self.piece_done(io, r.parent, Ok(()));
                }
            }
            self.piece_done(io, r.parent, Ok(()));
            return;
        }
        self.piece_done(io, r.parent, result);
    }

    fn start_rebuilt_read(&mut self, io: &mut Io<'_>, parent: u32, p: &Piece) {
        let Some(par) = self.parents.get_mut(parent) else {
            return;
        };
        par.pending += 1;
        let start = p.chunk as u64 * self.layout.unit + p.within;
        let op = self.new_op(OpKind::Rebuilt, p.row, parent, p.at, start, start + p.len);
        self.lock(io, op);
    }

    fn start_write(&mut self, io: &mut Io<'_>, bio: Bio) {
        let (offset, len, data) = (bio.offset, bio.length, bio.cmd == BioCmd::Write);
        let parent = self.new_parent(bio);
        if !data {
            // Write-zeroes and discard write zeroes (a discarded range
            // reads back as zeroes, as it does on the members).
            match try_zeroes(len) {
                Ok(z) => {
                    if let Some(p) = self.parents.get_mut(parent) {
                        p.zeroes = Some(z);
                    }
                }
                Err(_) => return self.piece_done(io, parent, Err(BioError::NoMemory)),
            }
        }
        let rb = self.layout.row_bytes();
        let mut pos = 0;
        while pos < len {
            let x = offset + pos;
            let (row, within) = (x / rb, x % rb);
            let take = (rb - within).min(len - pos);
            if let Some(p) = self.parents.get_mut(parent) {
                p.pending += 1;
            }
            let op = self.new_op(OpKind::Write, row, parent, pos, within, within + take);
            self.lock(io, op);
            pos += take;
        }
        self.piece_done(io, parent, Ok(()));
    }

    pub(super) fn new_op(
        &mut self,
        kind: OpKind,
        row: u64,
        parent: u32,
        at: u64,
        start: u64,
        end: u64,
    ) -> u32 {
        if kind == OpKind::Write {
            self.writes_started += 1;
        }
        self.ops.insert(RowOp {
            kind,
            phase: Phase::Queued,
            row,
            parent,
            at,
            start,
            end,
            plan: 0,
            col0: 0,
            col1: 0,
            blocks: Vec::new(),
            pending: 0,
            bufs: Vec::new(),
            pp: Vec::new(),
            slot: None,
            mask: 0,
            down: 0,
            reserved: 0,
            failed_io: false,
            result: Ok(()),
        })
    }

    /// Queues `op` on its row; it runs when it is the head.
    pub(super) fn lock(&mut self, io: &mut Io<'_>, op: u32) {
        let Some(row) = self.ops.get(op).map(|o| o.row) else {
            return;
        };
        let q = self.locks.entry(row).or_default();
        q.push_back(op);
        if q.len() == 1 {
            self.run_op(io, op);
        }
    }

    /// `op` is done with its row: the next one on the row runs.
    pub(super) fn unlock(&mut self, io: &mut Io<'_>, op: u32, row: u64) {
        let next = match self.locks.get_mut(&row) {
            Some(q) => {
                if q.front() == Some(&op) {
                    q.pop_front();
                }
                let next = q.front().copied();
                if q.is_empty() {
                    self.locks.remove(&row);
                }
                next
            }
            None => None,
        };
        if let Some(n) = next {
            self.run_op(io, n);
        }
    }

    /// Starts (or restarts, after a member failed) the op holding its row.
    pub(super) fn run_op(&mut self, io: &mut Io<'_>, op: u32) {
        let Some(kind) = self.ops.get(op).map(|o| o.kind) else {
            return;
        };
        match kind {
            OpKind::Write | OpKind::Rebuilt => self.plan_op(io, op),
            OpKind::Job => self.job_row_start(io, op),
            OpKind::Scrub => self.scrub_row_start(io, op),
        }
    }

    /// The row-relative written range of chunk `k` (empty: `s == e`).
    fn chunk_range(&self, o: &RowOp, k: usize) -> (u64, u64) {
        let u = self.layout.unit;
        let (cs, ce) = (k as u64 * u, (k as u64 + 1) * u);
        let (s, e) = (o.start.max(cs), o.end.min(ce));
        if s >= e {
            (0, 0)
        } else {
            (s - cs, e - cs)
        }
    }

    /// True when `o`'s row holds bytes a logged write left unflushed
    /// outside what `o` writes (on members that serve the row).
    fn dirty_beyond(&self, o: &RowOp) -> bool {
        if !self.ppl || o.kind != OpKind::Write {
            return false;
        }
        let Some((_, hull)) = self.unflushed.get(&o.row) else {
            return false;
        };
        hull.iter().enumerate().any(|(k, &(hs, he))| {
            let (s, e) = self.chunk_range(o, k);
            hs < he && self.available(self.layout.member(o.row, k), o.row) && (hs < s || he > e || s == e)
        })
    }

    fn method(&self, o: &RowOp) -> Result<Method, BioError> {
        let row = o.row;
        let down = self.unavailable(row);
        if down.len() > 1 {
            return Err(BioError::Io);
        }
        let p = self.layout.parity(row);
        if down.first() == Some(&p) {
            return Ok(Method::NoParity);
        }
        if !down.is_empty() || o.kind == OpKind::Rebuilt {
            return Ok(Method::Degraded);
        }
        let (mut rmw, mut rcw) = (0, 0);
        for c in o.col0..o.col1 {
            let (cs, ce) = (c * COLUMN, (c + 1) * COLUMN);
            let mut touched = false;
            for k in 0..self.layout.data() {
                let (s, e) = self.chunk_range(o, k);
                let (ws, we) = (s.max(cs), e.min(ce));
                if ws < we {
                    touched = true;
                    rmw += 1;
                }
                if !(ws == cs && we == ce) {
                    rcw += 1;
                }
            }
            if touched {
                rmw += 1;
            }
        }
        Ok(if rmw < rcw {
            Method::ReadModify
        } else {
            Method::Reconstruct
        })
    }

    /// Plans a row op: which blocks it needs, and asks the cache for them.
    fn plan_op(&mut self, io: &mut Io<'_>, op: u32) {
        let n = self.members.len();
        let cols = self.layout.columns();
        let Some(o) = self.ops.get_mut(op) else {
            return;
        };
        o.plan += 1;
        o.phase = Phase::Reading;
        o.failed_io = false;
        let held = core::mem::take(&mut o.reserved);
        self.reserved -= held;
        let Some(o) = self.ops.get_mut(op) else {
            return;
        };
        let u = self.layout.unit;
        let (ks, ke) = (o.start % u, (o.end - 1) % u + 1);
        let (c0, c1) = if o.start / u == (o.end - 1) / u {
            (ks / COLUMN, ke.div_ceil(COLUMN))
        } else {
            (0, cols)
        };
        o.col0 = c0;
        o.col1 = c1;
        let width = (c1 - c0) as usize;
        // Drop what an earlier plan held.
        let old: Vec<_> = core::mem::take(&mut o.blocks).into_iter().flatten().collect();
        o.blocks = vec![None; n * width];
        o.pp.clear();
        // A parity block an earlier plan computed into holds bytes no
        // member has: dropped, so the new plan reads it again.
        let pblocks = self.layout.member_blocks(self.layout.parity(o.row));
        for h in old {
            let b = self.cache.block(h);
            self.cache.unpin(h);
            if pblocks.contains(&b) {
                self.cache.invalidate(b..b + 1);
            }
        }
        let down = self.down_mask(self.ops.get(op).map_or(0, |o| o.row));
        if let Some(o) = self.ops.get_mut(op) {
            o.down = down;
        }
        let o = self.ops.get(op).expect("op");
        let method = match self.method(o) {
            Ok(m) => m,
            Err(e) => return self.finish_op(io, op, Err(e)),
        };
        if method != Method::NoParity && self.dirty_beyond(o) {
            if let Some(o) = self.ops.get_mut(op) {
                o.phase = Phase::FlushWait;
            }
            self.flush_waiters.push_back(op);
            return self.start_checkpoint(io);
        }
        let o = self.ops.get(op).expect("op");
        let row = o.row;
        let p = self.layout.parity(row);
        let mut wanted: Vec<(usize, u64, bool)> = Vec::new(); // member, column, read
        for c in c0..c1 {
            let (cs, ce) = (c * COLUMN, (c + 1) * COLUMN);
            let spans: Vec<(usize, bool, bool)> = (0..self.layout.data())
                .map(|k| {
                    let (s, e) = self.chunk_range(o, k);
                    let (ws, we) = (s.max(cs), e.min(ce));
                    (self.layout.member(row, k), ws < we, ws == cs && we == ce)
                })
                .collect();
            if !spans.iter().any(|s| s.1) {
                continue;
            }
            for (m, written, full) in spans {
                let need = match method {
                    Method::ReadModify => written,
                    Method::Reconstruct => !full,
                    Method::Degraded => true,
                    Method::NoParity => false,
                };
                // A rebuilt read never reads the chunk it rebuilds.
                let target = o.kind == OpKind::Rebuilt && m == self.layout.member(row, (o.start / u) as usize);
                if need && self.available(m, row) && !target {
                    wanted.push((m, c, true));
                }
            }
            match method {
                Method::ReadModify | Method::Degraded => wanted.push((p, c, true)),
                Method::Reconstruct => wanted.push((p, c, false)),
                Method::NoParity => {}
            }
        }
        if method == Method::NoParity && o.kind == OpKind::Rebuilt {
            // The chunk asked for is on the parity-less member? It cannot
            // be: a missing parity member leaves every data chunk readable.
            return self.finish_op(io, op, Err(BioError::Io));
        }
        // Room in the stripe cache for every block the op pins, so ops
        // holding part of what they need never fill it between them.
        let need = wanted.len();
        if need > 0 && self.reserved > 0 && self.reserved + need > self.cache.config().capacity() {
            self.room_waiters.push_back(op);
            return;
        }
        self.reserved += need;
        let plan = o.plan;
        if let Some(o) = self.ops.get_mut(op) {
            o.reserved = need;
        }
        let mut waiting = 0;
        for (m, c, read) in wanted {
            let block = self.layout.block(m, row, c);
            let waiter = waiter(op, plan, m * width + (c - c0) as usize);
            let got = if read {
                self.cache.get(block, waiter)
            } else {
                self.cache.get_blank(block, waiter)
            };
            match got {
                Lookup::Hit(h) => {
                    if let Some(o) = self.ops.get_mut(op) {
                        o.blocks[m * width + (c - c0) as usize] = Some(h);
                    }
                }
                Lookup::Wait => waiting += 1,
            }
        }
        if let Some(o) = self.ops.get_mut(op) {
            o.pending = waiting;
        }
        if waiting == 0 {
            self.blocks_ready(io, op);
        }
    }

    /// The stripe cache answered a wait.
    pub(super) fn cache_ready(&mut self, io: &mut Io<'_>, r: Ready) {
        let Ready::Block { waiter: w, result } = r else {
            return;
        };
        let (op, plan, idx) = unwaiter(w);
        let live = self
            .ops
            .get(op)
            .is_some_and(|o| o.plan == plan && o.phase == Phase::Reading);
        if !live {
            if let Ok(h) = result {
                self.cache.unpin(h);
            }
            return;
        }
        let width = {
            let o = self.ops.get(op).expect("op");
            (o.col1 - o.col0) as usize
        };
        match result {
            Ok(h) => {
                let o = self.ops.get_mut(op).expect("op");
                if let Some(slot) = o.blocks.get_mut(idx) {
                    *slot = Some(h);
                } else {
                    self.cache.unpin(h);
                }
                o.pending -= 1;
                if o.pending == 0 {
                    self.blocks_ready(io, op);
                }
            }
            Err(bufcache::Error::NoMemory) => {
                if let Some(o) = self.ops.get_mut(op) {
                    o.pending -= 1;
                    o.result = Err(BioError::NoMemory);
                    if o.pending == 0 {
                        self.finish_op(io, op, Err(BioError::NoMemory));
                    }
                }
            }
            Err(bufcache::Error::Io) => {
                // The member that failed the read leaves; the op starts over.
                let m = idx / width;
                self.fail_member(io, m, "read error");
                if let Some(o) = self.ops.get_mut(op) {
                    o.pending -= 1;
                    if o.pending == 0 {
                        self.plan_op(io, op);
                    } else {
                        // Wait for the rest, then plan again.
                        o.failed_io = true;
                    }
                }
            }
        }
    }

    /// Every block of the plan is pinned: compute, then log or write.
    fn blocks_ready(&mut self, io: &mut Io<'_>, op: u32) {
        // A member left (or came) since the plan: its blocks are not the
        // ones the new state needs.
        if self.ops.get(op).is_some_and(|o| o.failed_io) || self.stale(op) {
            return self.plan_op(io, op);
        }
        if self.ops.get(op).is_some_and(|o| o.result.is_err()) {
            let r = self.ops.get(op).map(|o| o.result).unwrap_or(Ok(()));
            return self.finish_op(io, op, r);
        }
        let kind = self.ops.get(op).map(|o| o.kind);
        if kind == Some(OpKind::Write) && self.data_lent(op) {
            // A page of the new data straddles a row whose write holds it
            // at a device: compute once that write is back.
            self.busy_waiters.push_back(op);
            return;
        }
        let r = if kind == Some(OpKind::Rebuilt) {
            self.compute_rebuilt(io, op)
        } else {
            self.compute_write(io, op)
        };
        if let Err(e) = r {
            return self.finish_op(io, op, Err(e));
        }
        if kind == Some(OpKind::Rebuilt) {
            return self.finish_op(io, op, Ok(()));
        }
        let o = self.ops.get(op).expect("op");
        let p = self.layout.parity(o.row);
        if self.ppl && self.available(p, o.row) {
            if let Some(o) = self.ops.get_mut(op) {
                o.phase = Phase::SlotWait;
            }
            self.slot_waiters.push_back(op);
            self.grant_slots(io);
        } else {
            self.write_row(io, op);
        }
    }

    /// The members that cannot serve `row`, as bits.
    fn down_mask(&self, row: u64) -> u64 {
        self.unavailable(row).iter().fold(0, |a, &m| a | 1 << m)
    }

    /// True when the members serving `op`'s row changed since it was
    /// planned (its parity and log entry would not match what is written).
    fn stale(&self, op: u32) -> bool {
        self.ops
            .get(op)
            .is_some_and(|o| self.down_mask(o.row) != o.down)
    }

    /// True when a page of the data `op` writes is lent to a device.
    fn data_lent(&self, op: u32) -> bool {
        let Some(o) = self.ops.get(op) else {
            return false;
        };
        let Some((data, base)) = self.op_data(o) else {
            return false;
        };
        data.slice(base, o.end - o.start)
            .iter()
            .any(|r| r.page.is_lent())
    }

    /// Retries the ops that waited for lent data pages.
    fn retry_busy(&mut self, io: &mut Io<'_>) {
        for op in core::mem::take(&mut self.busy_waiters) {
            if self.ops.get(op).is_some_and(|o| o.phase == Phase::Reading) {
                self.blocks_ready(io, op);
            }
        }
    }

    /// The data `op` writes: its pages and the byte of them where the
    /// op's row-relative byte `start` is.
    fn op_data(&self, o: &RowOp) -> Option<(SgList, u64)> {
        let p = self.parents.get(o.parent)?;
        match &p.zeroes {
            Some(z) => Some((z.clone(), o.at)),
            None => Some((p.bio.sg.clone(), o.at)),
        }
    }

    fn page_of(&self, o: &RowOp, m: usize, c: u64) -> Option<Page> {
        let width = (o.col1 - o.col0) as usize;
        let h = o.blocks.get(m * width + (c - o.col0) as usize).copied().flatten()?;
        Some(self.cache.try_buf(h)?.clone())
    }

    /// New parity (into the parity member's cache blocks) and partial
    /// parity (into fresh pages) for every column of a write.
    fn compute_write(&mut self, io: &mut Io<'_>, op: u32) -> Result<(), BioError> {
        let o = self.ops.get(op).ok_or(BioError::Io)?;
        let method = self.method(o)?;
        if method == Method::NoParity {
            return Ok(());
        }
        let (data, base) = self.op_data(o).ok_or(BioError::Io)?;
        let counters = &io.stats(self.provider).data;
        let row = o.row;
        let p = self.layout.parity(row);
        let missing = self.unavailable(row).first().copied();
        let mut pps = Vec::new();
        let mut mask = 0u64;
        // A full-row write's partial parity is zero, unless a data member is
        // missing: then it is that member's new chunk.
        let full_row = o.start == 0 && o.end == self.layout.row_bytes() && missing.is_none();
        for c in o.col0..o.col1 {
            let (cs, ce) = (c * COLUMN, (c + 1) * COLUMN);
            // Per data chunk: its member, written range in the column
            // (column-relative) and the new data's byte in `data`.
            let mut parts = Vec::new();
            for k in 0..self.layout.data() {
                let m = self.layout.member(row, k);
                let (s, e) = self.chunk_range(o, k);
                let (ws, we) = (s.max(cs), e.min(ce));
                let w = (ws < we).then(|| {
                    let row_rel = k as u64 * self.layout.unit + ws;
                    ((ws - cs) as usize, (we - ws) as usize, base + row_rel - o.start)
                });
                parts.push((m, w));
            }
            let touched = parts.iter().any(|(_, w)| w.is_some());
            if !touched {
                continue;
            }
            let ppage = self.page_of(o, p, c).ok_or(BioError::Io)?;
            let blocks: Vec<Option<SgList>> = parts
                .iter()
                .map(|(m, _)| self.page_of(o, *m, c).map(|pg| page_list(&pg)))
                .collect();
            let plist = page_list(&ppage);
            let whole = |sg| Source { sg, at: 0, to: 0, len: PAGE_SIZE, mix: Mix::Xor };
            match method {
                Method::ReadModify => {
                    let mut src = Vec::new();
                    for (i, (_, w)) in parts.iter().enumerate() {
                        if let (Some((to, len, at)), Some(old)) = (w, &blocks[i]) {
                            src.push(Source { sg: old, at: *to as u64, to: *to, len: *len, mix: Mix::Xor });
                            src.push(Source { sg: &data, at: *at, to: *to, len: *len, mix: Mix::Xor });
                        }
                    }
                    combine(&ppage, &src, counters)?;
                }
                Method::Reconstruct => {
                    let mut src = Vec::new();
                    for (i, (_, w)) in parts.iter().enumerate() {
                        let full = w.is_some_and(|(_, len, _)| len == PAGE_SIZE);
                        if !full {
                            let old = blocks[i].as_ref().ok_or(BioError::Io)?;
                            src.push(whole(old));
                            if let Some((to, len, _)) = w {
                                src.push(Source { sg: old, at: *to as u64, to: *to, len: *len, mix: Mix::Xor });
                            }
                        }
                        if let Some((to, len, at)) = w {
                            src.push(Source { sg: &data, at: *at, to: *to, len: *len, mix: Mix::Xor });
                        }
                    }
                    if let Some(first) = src.first_mut() {
                        first.mix = Mix::Copy;
                    }
                    combine(&ppage, &src, counters)?;
                }
                Method::Degraded => {
                    // The missing chunk as it is: parity XOR the others.
                    let gone = Page::try_new_zeroed()?;
                    let mut src = vec![Source { sg: &plist, at: 0, to: 0, len: PAGE_SIZE, mix: Mix::Copy }];
                    for (i, (m, _)) in parts.iter().enumerate() {
                        if Some(*m) != missing {
                            src.push(whole(blocks[i].as_ref().ok_or(BioError::Io)?));
                        }
                    }
                    combine(&gone, &src, counters)?;
                    let gone_list = page_list(&gone);
                    // New parity: every chunk as it will be.
                    let mut src = Vec::new();
                    for (i, (m, w)) in parts.iter().enumerate() {
                        let old = if Some(*m) == missing { &gone_list } else { blocks[i].as_ref().ok_or(BioError::Io)? };
                        src.push(whole(old));
                        if let Some((to, len, at)) = w {
                            src.push(Source { sg: old, at: *to as u64, to: *to, len: *len, mix: Mix::Xor });
                            src.push(Source { sg: &data, at: *at, to: *to, len: *len, mix: Mix::Xor });
                        }
                    }
                    src[0].mix = Mix::Copy;
                    combine(&ppage, &src, counters)?;
                }
                Method::NoParity => {}
            }
            if self.ppl && !full_row {
                // Partial parity: the new parity without the data this
                // write puts on disk.
                let pp = Page::try_new_zeroed()?;
                let mut src = vec![Source { sg: &plist, at: 0, to: 0, len: PAGE_SIZE, mix: Mix::Copy }];
                for (m, w) in &parts {
                    if Some(*m) != missing {
                        if let Some((to, len, at)) = w {
                            src.push(Source { sg: &data, at: *at, to: *to, len: *len, mix: Mix::Xor });
                        }
                    }
                }
                combine(&pp, &src, counters)?;
                pps.push(pp);
            }
            // A full-row write's partial parity is zero: not logged.
            mask |= 1 << c;
        }
        if let Some(o) = self.ops.get_mut(op) {
            o.pp = pps;
            o.mask = mask;
        }
        Ok(())
    }

    /// A read of a chunk on a missing member: parity XOR the row's other
    /// data, into the client's pages.
    fn compute_rebuilt(&mut self, io: &mut Io<'_>, op: u32) -> Result<(), BioError> {
        let o = self.ops.get(op).ok_or(BioError::Io)?;
        let (row, u) = (o.row, self.layout.unit);
        let k = (o.start / u) as usize;
        let gone_member = self.layout.member(row, k);
        let (s, e) = (o.start % u, (o.end - 1) % u + 1);
        let out = try_zeroes(o.end - o.start)?;
        let counters = &io.stats(self.provider).data;
        let tmp = Page::try_new_zeroed()?;
        for c in o.col0..o.col1 {
            let (cs, ce) = (c * COLUMN, (c + 1) * COLUMN);
            let (ws, we) = (s.max(cs), e.min(ce));
            if ws >= we {
                continue;
            }
            let mut lists = Vec::new();
            for m in 0..self.members.len() {
                if m != gone_member {
                    lists.push(page_list(&self.page_of(o, m, c).ok_or(BioError::Io)?));
                }
            }
            let mut src: Vec<Source<'_>> = lists
                .iter()
                .map(|sg| Source { sg, at: 0, to: 0, len: PAGE_SIZE, mix: Mix::Xor })
                .collect();
            src[0].mix = Mix::Copy;
            combine(&tmp, &src, counters)?;
            let (from, len) = ((ws - cs) as usize, (we - ws) as usize);
            super::layout::with_page(&tmp, counters, |b| {
                out.copy_from_slice(ws - s, &b[from..from + len], counters)
            })??;
        }
        let (parent, at) = (o.parent, o.at);
        if let Some(p) = self.parents.get_mut(parent) {
            p.fills.push((at, out));
        }
        Ok(())
    }

    /// Hands out log slots to the ops waiting for one, in order; when the
    /// parity member's slots are all taken, a checkpoint frees them.
    pub(super) fn grant_slots(&mut self, io: &mut Io<'_>) {
        // The first entry after a clean stop waits until the records no
        // longer say clean, so a cut after it is replayed.
        if self.clean && !self.slot_waiters.is_empty() {
            self.clean = false;
            self.dirty_version = self.touch_all();
        }
        let dirty_known = (0..self.members.len())
            .filter(|&m| self.present(m))
            .all(|m| self.members[m].meta_durable >= self.dirty_version);
        if !dirty_known {
            return;
        }
        while let Some(&op) = self.slot_waiters.front() {
            let Some(row) = self.ops.get(op).map(|o| o.row) else {
                self.slot_waiters.pop_front();
                continue;
            };
            let p = self.layout.parity(row);
            if !self.available(p, row) || self.stale(op) {
                self.slot_waiters.pop_front();
                self.plan_op(io, op);
                continue;
            }
            let Some(slot) = self.slots[p].iter().position(|&s| s == 0) else {
                self.start_checkpoint(io);
                return;
            };
            self.slot_waiters.pop_front();
            let seq = self.next_seq;
            self.next_seq += 1;
            self.slots[p][slot] = seq;
            self.incomplete.insert(seq);
            if let Some(o) = self.ops.get_mut(op) {
                o.slot = Some((p, slot as u64, seq));
                o.phase = Phase::Logging;
            }
            if self.write_log(io, op).is_err() {
                self.finish_op(io, op, Err(BioError::NoMemory));
            }
        }
    }

    /// Writes `op`'s log entry (FUA) into its slot.
    fn write_log(&mut self, io: &mut Io<'_>, op: u32) -> Result<(), BioError> {
        let o = self.ops.get(op).ok_or(BioError::Io)?;
        let (p, slot, seq) = o.slot.ok_or(BioError::Io)?;
        let written: Vec<(u32, u32)> = (0..self.layout.data())
            .map(|k| {
                let m = self.layout.member(o.row, k);
                let (s, e) = self.chunk_range(o, k);
                if self.available(m, o.row) {
                    (s as u32, e as u32)
                } else {
                    (0, 0)
                }
            })
            .collect();
        let entry = Entry {
            id: self.id,
            seq,
            watermark: self.watermark,
            row: o.row,
            col: o.col0 as u32,
            cols: (o.col1 - o.col0) as u32,
            has_pp: !o.pp.is_empty(),
            mask: o.mask,
            written,
        };
        let mut header = entry.emit();
        let meta = io.meta_counters();
        // The partial parity is checksummed where it lies, mapped, not
        // copied out.
        let mut sum = ppl::start_checksum(&header, self.id);
        for pg in &o.pp {
            super::layout::with_page(pg, meta, |b| sum.write(b))?;
        }
        ppl::seal(&mut header, sum.finish());
        let mut sg = SgList::from_bytes(&header, meta);
        for pg in &o.pp {
            sg.append(&page_list(pg));
        }
        let at = self.layout.slot_offset(slot);
        let mut bio = Bio::with_data(BioCmd::Write, at, sg);
        bio.fua = true;
        let plan = o.plan;
        if !self.send(io, p, bio, cookie(Kind::OpLog, p, plan16(plan), op)) {
            return Err(BioError::Io);
        }
        Ok(())
    }

    /// The log entry is stable (or failed): write the row.
    pub(super) fn log_done(&mut self, io: &mut Io<'_>, op: u32, plan: u32, m: usize, result: BioResult) {
        let _ = m;
        if self.ops.get(op).is_none_or(|o| plan16(o.plan) != plan) {
            return;
        }
        if result.is_err() {
            let p = self.ops.get(op).and_then(|o| o.slot).map(|s| s.0);
            self.release_slot(op);
            if let Some(p) = p {
                self.fail_member(io, p, "log write error");
            }
            return self.plan_op(io, op);
        }
        self.write_row(io, op);
    }

    fn release_slot(&mut self, op: u32) {
        if let Some((p, slot, seq)) = self.ops.get_mut(op).and_then(|o| o.slot.take()) {
            if self.slots[p][slot as usize] == seq {
                self.slots[p][slot as usize] = 0;
            }
            self.incomplete.remove(&seq);
        }
    }

    /// Sends the row's data and parity writes.
    fn write_row(&mut self, io: &mut Io<'_>, op: u32) {
        if self.stale(op) {
            self.release_slot(op);
            return self.plan_op(io, op);
        }
        let Some(o) = self.ops.get(op) else {
            return;
        };
        let Some((data, base)) = self.op_data(o) else {
            return self.finish_op(io, op, Err(BioError::Io));
        };
        let fua = self.parents.get(o.parent).is_some_and(|p| p.bio.fua);
        let row = o.row;
        let plan = o.plan;
        let mut sends: Vec<(usize, Bio, u64)> = Vec::new();
        for k in 0..self.layout.data() {
            let m = self.layout.member(row, k);
            let (s, e) = self.chunk_range(o, k);
            if s == e || !self.available(m, row) {
                continue;
            }
            let at = base + k as u64 * self.layout.unit + s - o.start;
            let mut bio = Bio::with_data(
                BioCmd::Write,
                self.layout.row_offset(row) + s,
                data.slice(at, e - s),
            );
            bio.fua = fua;
            sends.push((m, bio, cookie(Kind::OpData, m, plan16(plan), op)));
        }
        let p = self.layout.parity(row);
        if self.available(p, row) {
            // One write per run of columns whose parity was computed.
            let mut run: Option<(u64, SgList)> = None;
            for c in o.col0..=o.col1 {
                match (c < o.col1).then(|| self.page_of(o, p, c)).flatten() {
                    Some(pg) => match &mut run {
                        Some((_, sg)) => sg.append(&page_list(&pg)),
                        None => run = Some((c, page_list(&pg))),
                    },
                    None => {
                        if let Some((first, sg)) = run.take() {
                            let mut bio = Bio::with_data(
                                BioCmd::Write,
                                self.layout.row_offset(row) + first * COLUMN,
                                sg,
                            );
                            bio.fua = fua;
                            sends.push((p, bio, cookie(Kind::OpParity, p, plan16(plan), op)));
                        }
                    }
                }
            }
        }
        if let Some(o) = self.ops.get_mut(op) {
            o.phase = Phase::Writing;
            o.pending = sends.len() as u32;
        }
        if sends.is_empty() {
            return self.finish_op(io, op, Ok(()));
        }
        for (m, bio, ck) in sends {
            if !self.send(io, m, bio, ck) {
                self.row_write_done(io, op, m, Err(BioError::Io));
            }
        }
    }

    /// One data or parity write of a row came back.
    pub(super) fn row_write_done(&mut self, io: &mut Io<'_>, op: u32, m: usize, result: BioResult) {
        if !self.busy_waiters.is_empty() {
            self.retry_busy(io);
        }
        if result.is_err() {
            self.fail_member(io, m, "write error");
            if let Some(o) = self.ops.get_mut(op) {
                o.failed_io = true;
            }
        }
        let Some(o) = self.ops.get_mut(op) else {
            return;
        };
        o.pending -= 1;
        if o.pending > 0 {
            return;
        }
        let (failed, row) = (o.failed_io, o.row);
        // A write that lost a member is kept if the row can still tell it.
        let r = if failed && self.unavailable(row).len() > 1 {
            Err(BioError::Io)
        } else {
            Ok(())
        };
        self.finish_op(io, op, r);
    }

    /// Ends a row op: its blocks go back to the cache (parity written is
    /// valid there, replaced data is dropped), its slot's entry is
    /// complete, the row passes on, and its parent hears.
    pub(super) fn finish_op(&mut self, io: &mut Io<'_>, op: u32, result: BioResult) {
        let Some(o) = self.ops.remove(op) else {
            return;
        };
        self.reserved -= o.reserved;
        let width = (o.col1 - o.col0) as usize;
        let p = self.layout.parity(o.row);
        let wrote = o.kind == OpKind::Write && o.phase == Phase::Writing;
        for (i, h) in o.blocks.iter().enumerate() {
            let Some(h) = *h else { continue };
            let m = i / width.max(1);
            if wrote && m == p && result.is_ok() && self.present(p) {
                self.cache.set_valid(h);
                self.cache.unpin(h);
            } else if o.kind == OpKind::Write && (m == p || self.wrote_block(&o, m, i % width.max(1))) {
                let b = self.cache.block(h);
                self.cache.unpin(h);
                self.cache.invalidate(b..b + 1);
            } else {
                self.cache.unpin(h);
            }
        }
        if o.kind == OpKind::Write {
            // Cached copies of the data it replaced, pinned or not, are stale.
            for k in 0..self.layout.data() {
                let (s, e) = self.chunk_range(&o, k);
                if s < e {
                    let m = self.layout.member(o.row, k);
                    let b = self.layout.block(m, o.row, 0);
                    self.cache
                        .invalidate(b + s / COLUMN..b + e.div_ceil(COLUMN));
                }
            }
        }
        if let Some((_, _, seq)) = o.slot {
            // Its bytes are unflushed until a round sent from now on.
            let rounds = self.flush_rounds;
            let data = self.layout.data();
            let ranges: Vec<(u64, u64)> = (0..data).map(|k| self.chunk_range(&o, k)).collect();
            let (at, hull) = self.unflushed.entry(o.row).or_insert((0, vec![(0, 0); data]));
            *at = rounds;
            for (h, &(s, e)) in hull.iter_mut().zip(&ranges) {
                if s < e {
                    *h = if h.0 < h.1 { (h.0.min(s), h.1.max(e)) } else { (s, e) };
                }
            }
            self.incomplete.remove(&seq);
            if self.slot_waiters.front().is_some() && !self.checkpoint_inflight {
                self.grant_slots(io);
            }
        }
        // A job's or scrub's progress moves before the row passes on: an
        // op queued behind a rebuild's row must plan with the row rebuilt
        // (or it leaves the target out of a write it has just rebuilt).
        match o.kind {
            OpKind::Job => self.job_row_done(io, result),
            OpKind::Scrub => self.scrub_row_done(io),
            OpKind::Write | OpKind::Rebuilt => {}
        }
        self.unlock(io, op, o.row);
        while let Some(&next) = self.room_waiters.front() {
            let fits = self.ops.get(next).is_none()
                || self.reserved == 0
                || self.reserved + self.layout.members * self.layout.columns() as usize
                    <= self.cache.config().capacity();
            if !fits {
                break;
            }
            self.room_waiters.pop_front();
            self.plan_op(io, next);
        }
        if matches!(o.kind, OpKind::Write | OpKind::Rebuilt) {
            self.piece_done(io, o.parent, result);
        }
    }

    /// True when `o` wrote member `m`'s block at column index `ci`.
    fn wrote_block(&self, o: &RowOp, m: usize, ci: usize) -> bool {
        let Some(k) = self.layout.chunk_of(o.row, m) else {
            return false;
        };
        let (s, e) = self.chunk_range(o, k);
        let c = o.col0 + ci as u64;
        s < (c + 1) * COLUMN && e > c * COLUMN
    }

    /// A flush of every present member: a client's FLUSH (`bio`), or a
    /// checkpoint of the log or of a job.
    pub(super) fn start_flush(&mut self, io: &mut Io<'_>, bio: Option<Bio>, job: bool) {
        let parent = bio.map(|b| self.new_parent(b));
        let watermark = self
            .incomplete
            .first()
            .map_or(self.next_seq - 1, |s| s - 1);
        let targets: Vec<usize> = (0..self.members.len()).filter(|&m| self.present(m)).collect();
        let idle = self.idle();
        self.flush_rounds += 1;
        let id = self.flushes.insert(FlushRound {
            pending: targets.len() as u32,
            watermark,
            round: self.flush_rounds,
            parent,
            job,
            idle,
            writes: self.writes_started,
            result: Ok(()),
        });
        if targets.is_empty() {
            return self.flush_round_done(io, id);
        }
        for m in targets {
            if !self.send(io, m, Bio::flush(), cookie(Kind::Flush, m, 0, id)) {
                self.flush_member_done(io, id, m, Err(BioError::Io));
            }
        }
    }

    /// No write is in flight and no log entry is incomplete.
    fn idle(&self) -> bool {
        self.incomplete.is_empty() && !self.ops.iter().any(|(_, o)| o.kind == OpKind::Write)
    }

    /// Frees every log slot whose entry the members are sure to hold.
    pub(super) fn start_checkpoint(&mut self, io: &mut Io<'_>) {
        if !self.checkpoint_inflight {
            self.checkpoint_inflight = true;
            self.start_flush(io, None, false);
        }
    }

    pub(super) fn flush_member_done(&mut self, io: &mut Io<'_>, id: u32, m: usize, result: BioResult) {
        if result.is_err() {
            self.fail_member(io, m, "flush error");
        }
        let Some(f) = self.flushes.get_mut(id) else {
            return;
        };
        f.pending -= 1;
        if f.pending == 0 {
            self.flush_round_done(io, id);
        }
    }

    fn flush_round_done(&mut self, io: &mut Io<'_>, id: u32) {
        let Some(f) = self.flushes.remove(id) else {
            return;
        };
        // A member that failed its flush has left; what it held is held
        // by the rest unless two are gone.
        let broken = self
            .members
            .iter()
            .filter(|m| matches!(m.state, MemberState::Missing | MemberState::Failed))
            .count()
            > 1;
        let result = if broken { Err(BioError::Io) } else { f.result };
        if result.is_ok() {
            // The rows written before the round was sent are durable.
            self.unflushed.retain(|_, (at, _)| *at >= f.round);
        }
        if result.is_ok() && f.watermark > self.watermark {
            self.watermark = f.watermark;
            for slots in &mut self.slots {
                for s in slots.iter_mut() {
                    if *s != 0 && *s <= f.watermark {
                        *s = 0;
                    }
                }
            }
        }
        if f.parent.is_none() && !f.job {
            self.checkpoint_inflight = false;
        }
        if f.job {
            self.job_flushed(io, result);
        }
        if let Some(p) = f.parent {
            // No write in flight when the flush was sent and none started
            // since (a write that ended while the flush was in flight
            // need not be on the disks yet): the records say clean (no
            // replay at the next assembly), and the FLUSH is answered
            // once they do.
            let quiet = f.idle && f.writes == self.writes_started && self.idle();
            if result.is_ok() && self.ppl && !self.clean && quiet {
                self.clean = true;
                self.barrier = self.touch_all();
            }
            self.piece_done(io, p, result);
        }
        for op in core::mem::take(&mut self.flush_waiters) {
            if self.ops.get(op).is_some_and(|o| o.phase == Phase::FlushWait) {
                self.plan_op(io, op);
            }
        }
        if !self.slot_waiters.is_empty() {
            self.grant_slots(io);
        }
    }

    /// Member `m` failed: it leaves the array (degraded), its cached
    /// blocks are dropped, and the members left record it before any write
    /// it missed is acknowledged.
    pub(super) fn fail_member(&mut self, io: &mut Io<'_>, m: usize, why: &str) {
        let _ = io;
        let mem = &mut self.members[m];
        if matches!(mem.state, MemberState::Missing | MemberState::Failed) {
            return;
        }
        mem.state = MemberState::Failed;
        mem.why = Some(alloc::string::String::from(why));
        mem.meta_wanted = false;
        let blocks = self.layout.member_blocks(m);
        self.cache.invalidate(blocks);
        if self.job.as_ref().is_some_and(|j| j.kind == super::JobKind::Rebuild(m)) {
            self.job = None;
        }
        self.generation += 1;
        self.barrier = self.touch_all();
    }

    /// Routes a completion by its cookie.
    pub(super) fn io_done(&mut self, io: &mut Io<'_>, raw: u64, bio: Bio, result: BioResult) {
        let (kind, m, a, b) = super::uncookie(raw);
        if let Some(mem) = self.members.get_mut(m) {
            mem.inflight = mem.inflight.saturating_sub(1);
        }
        match kind {
            k if k == Kind::Direct as u8 => self.direct_done(io, b, result),
            k if (k == Kind::OpData as u8 || k == Kind::OpParity as u8)
                && self.ops.get(b).is_some_and(|o| plan16(o.plan) == a) =>
            {
                self.row_write_done(io, b, m, result)
            }
            k if k == Kind::OpLog as u8 => self.log_done(io, b, a, m, result),
            k if k == Kind::OpChunk as u8 => self.chunk_done(io, b, a, m, bio, result),
            k if k == Kind::Cache as u8 => {
                let tag = Tag(raw & 0xffff_ffff_ffff);
                if let Some((tag, buf, r)) = self.cache.store_mut().bio_done(tag, bio, result) {
                    self.cache.complete(tag, buf, r);
                }
            }
            k if k == Kind::Meta as u8 => self.meta_done(io, m, result),
            k if k == Kind::Flush as u8 => self.flush_member_done(io, b, m, result),
            k if k == Kind::Replay as u8 => self.replay_done(io, m, a, b, bio, result),
            _ => {}
        }
    }
}

/// A zero-filled page list of `len` bytes, or no memory.
fn try_zeroes(len: u64) -> Result<SgList, crate::page::NoMemory> {
    let mut sg = SgList::try_with_capacity(len.div_ceil(PAGE_SIZE as u64) as usize)?;
    let mut left = len;
    while left > 0 {
        let take = left.min(PAGE_SIZE as u64);
        sg.push(crate::page::PageRef {
            page: Page::try_new_zeroed()?,
            offset: 0,
            len: take as u32,
        });
        left -= take;
    }
    Ok(sg)
}

/// A cache waiter for block index `idx` of `op`'s plan `plan`.
fn waiter(op: u32, plan: u32, idx: usize) -> u64 {
    (u64::from(op) << 40) | (u64::from(plan & 0xff_ffff) << 16) | idx as u64
}

fn unwaiter(w: u64) -> (u32, u32, usize) {
    ((w >> 40) as u32, ((w >> 16) & 0xff_ffff) as u32, (w & 0xffff) as usize)
}
