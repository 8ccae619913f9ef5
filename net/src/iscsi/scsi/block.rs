//! The block commands (SBC-3): READ/WRITE(6/10/12/16), WRITE AND VERIFY,
//! VERIFY, COMPARE AND WRITE, WRITE SAME, UNMAP, GET LBA STATUS,
//! SYNCHRONIZE CACHE, PRE-FETCH, READ CAPACITY, START STOP UNIT: their CDB
//! checks, the bios they are carried out with, and what the completed
//! bios answer.

use super::inquiry::{max_caw_blocks, max_ws_blocks, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS};
use super::opcodes::*;
use super::{
    be, byte, sense, truncated, Cmp, Command, DataIn, Fail, Geometry, Kind, Res, Task, UnitState,
    Ws, WS_CHUNK,
};
use alloc::vec::Vec;
use geom::bio::{Bio, BioCmd};
use geom::page::{DataCounters, SgList, PAGE_SIZE};

/// LBA, number of blocks and the flags byte of a block CDB.
fn decode(cdb: &[u8]) -> (u64, u64, u8) {
    match byte(cdb, 0) >> 5 {
        0 => {
            let lba = be(cdb, 1, 3) & 0x1f_ffff;
            let n = be(cdb, 4, 1);
            let n = if n == 0 && matches!(byte(cdb, 0), READ_6 | WRITE_6) {
                256
            } else {
                n
            };
            (lba, n, 0)
        }
        1 | 2 => (be(cdb, 2, 4), be(cdb, 7, 2), byte(cdb, 1)),
        5 => (be(cdb, 2, 4), be(cdb, 6, 4), byte(cdb, 1)),
        _ => (be(cdb, 2, 8), be(cdb, 10, 4), byte(cdb, 1)),
    }
}

/// The medium may be written: neither the export is read-only nor SWP set.
fn writable(g: &Geometry<'_>, s: &UnitState) -> Res<()> {
    s.write_protect(g.export)
}

fn no_protect(flags: u8) -> Res<()> {
    if flags >> 5 != 0 {
        Err(sense::INVALID_FIELD_IN_CDB.into())
    } else {
        Ok(())
    }
}

fn max_transfer(g: &Geometry<'_>, n: u64) -> Res<()> {
    if n > u64::from(g.max_transfer_blocks()) {
        Err(sense::INVALID_FIELD_IN_CDB.into())
    } else {
        Ok(())
    }
}

/// The Data-Out must hold `need` bytes.
fn needs_out(cmd: &Command<'_>, need: u64) -> Res<u32> {
    match u32::try_from(need) {
        Ok(n) if n <= cmd.data_out_len => Ok(n),
        _ => Err(sense::INVALID_FIELD_IN_IU.into()),
    }
}

/// Checks a block command's CDB and sets the task up; `Ok(Some(data))`
/// when it is answered at once. `s` tells whether the unit is
/// write-protected.
pub(super) fn plan(
    t: &mut Task,
    cmd: &Command<'_>,
    g: &Geometry<'_>,
    s: &UnitState,
) -> Res<Option<DataIn>> {
    let cdb = cmd.cdb;
    let op = byte(cdb, 0);
    let (lba, n, flags) = decode(cdb);
    let fua = flags & 0x08 != 0 && g.export.can_flush;
    match op {
        READ_CAPACITY_10 => {
            if byte(cdb, 8) & 0x01 == 0 && be(cdb, 2, 4) != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB.into());
            }
            let last = u32::try_from(g.blocks.saturating_sub(1)).unwrap_or(u32::MAX);
            let mut v = Vec::new();
            v.extend_from_slice(&last.to_be_bytes());
            v.extend_from_slice(&g.bs.to_be_bytes());
            Ok(Some(DataIn::Bytes(v)))
        }
        SERVICE_ACTION_IN_16 if byte(cdb, 1) & 0x1f == SA_READ_CAPACITY_16 => {
            if byte(cdb, 14) & 0x01 == 0 && be(cdb, 2, 8) != 0 {
                return Err(sense::INVALID_FIELD_IN_CDB.into());
            }
            let mut v = alloc::vec![0u8; 32];
            v[0..8].copy_from_slice(&g.blocks.saturating_sub(1).to_be_bytes());
            v[8..12].copy_from_slice(&g.bs.to_be_bytes());
            v[13] = g.lbppb_exp();
            if g.export.can_trim {
                // LBPME; LBPRZ stays clear (see the B2h VPD page).
                v[14] = 0x80;
            }
            Ok(Some(truncated(v, be(cdb, 10, 4))))
        }
        SERVICE_ACTION_IN_16 => {
            // GET LBA STATUS.
            let lba = be(cdb, 2, 8);
            if lba >= g.blocks {
                return Err(sense::LBA_OUT_OF_RANGE.into());
            }
            let alloc = u32::try_from(be(cdb, 10, 4)).unwrap_or(u32::MAX);
            t.kind = Kind::LbaStatus { lba, alloc };
            Ok(None)
        }
        START_STOP_UNIT => {
            // A fixed disk: no medium to load or eject (LOEJ counts only
            // without a POWER CONDITION).
            if byte(cdb, 4) & 0xf2 == 0x02 {
                return Err(sense::INVALID_FIELD_IN_CDB.into());
            }
            Ok(Some(DataIn::None))
        }
        READ_6 | READ_10 | READ_12 | READ_16 => {
            no_protect(flags)?;
            g.check_range(lba, n)?;
            max_transfer(g, n)?;
            if n == 0 {
                return Ok(Some(DataIn::None));
            }
            let (off, len) = g.bytes(lba, n)?;
            t.kind = Kind::Read { off, fua };
            t.buf_len = len;
            Ok(None)
        }
        WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 | WRITE_VERIFY_10 | WRITE_VERIFY_12
        | WRITE_VERIFY_16 => {
            no_protect(flags)?;
            writable(g, s)?;
            g.check_range(lba, n)?;
            max_transfer(g, n)?;
            if n == 0 {
                return Ok(Some(DataIn::None));
            }
            let (off, len) = g.bytes(lba, n)?;
            t.out_want = needs_out(cmd, len)?;
            let verify = matches!(op, WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16);
            if verify {
                t.buf_len = len;
            }
            t.kind = Kind::Write {
                off,
                len,
                fua: fua || (verify && g.export.can_flush),
                verify,
            };
            Ok(None)
        }
        VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            no_protect(flags)?;
            let cmp = match (flags >> 1) & 0x03 {
                0 => Cmp::None,
                1 => Cmp::Full,
                3 => Cmp::Block,
                _ => return Err(sense::INVALID_FIELD_IN_CDB.into()),
            };
            g.check_range(lba, n)?;
            max_transfer(g, n)?;
            if n == 0 {
                return Ok(Some(DataIn::None));
            }
            let (off, len) = g.bytes(lba, n)?;
            t.out_want = match cmp {
                Cmp::None => 0,
                Cmp::Full => needs_out(cmd, len)?,
                Cmp::Block => needs_out(cmd, u64::from(g.bs))?,
            };
            t.buf_len = len;
            t.kind = Kind::Verify { off, len, cmp };
            Ok(None)
        }
        PRE_FETCH_10 | PRE_FETCH_16 => {
            g.check_range(lba, n)?;
            Ok(Some(DataIn::None))
        }
        SYNC_CACHE_10 | SYNC_CACHE_16 => {
            if lba > g.blocks {
                return Err(sense::LBA_OUT_OF_RANGE.into());
            }
            g.check_range(lba, n)?;
            if !g.export.can_flush {
                // Writes are stable once complete: nothing to flush.
                return Ok(Some(DataIn::None));
            }
            t.kind = Kind::Flush;
            Ok(None)
        }
        WRITE_SAME_10 | WRITE_SAME_16 => write_same(t, cmd, g, s, lba, n, flags),
        UNMAP => {
            writable(g, s)?;
            if byte(cdb, 1) & 0x01 != 0 {
                // ANCHOR: anchored blocks are not offered.
                return Err(sense::INVALID_FIELD_IN_CDB.into());
            }
            let len = be(cdb, 7, 2);
            if len == 0 {
                return Ok(Some(DataIn::None));
            }
            t.out_want = super::param_want(cmd, len)?;
            t.kind = Kind::Unmap;
            Ok(None)
        }
        COMPARE_AND_WRITE => {
            no_protect(flags)?;
            writable(g, s)?;
            let lba = be(cdb, 2, 8);
            let n = be(cdb, 13, 1);
            if n > u64::from(max_caw_blocks(g)) {
                return Err(sense::INVALID_FIELD_IN_CDB.into());
            }
            g.check_range(lba, n)?;
            if n == 0 {
                // No block, so no Data-Out: data sent anyway is a CDB the
                // initiator got wrong (a count that did not fit the byte).
                if cmd.data_out_len != 0 {
                    return Err(sense::INVALID_FIELD_IN_CDB.into());
                }
                return Ok(Some(DataIn::None));
            }
            let (off, len) = g.bytes(lba, n)?;
            if u64::from(cmd.data_out_len) != 2 * len {
                return Err(sense::INVALID_FIELD_IN_IU.into());
            }
            t.out_want = needs_out(cmd, 2 * len)?;
            t.buf_len = len;
            t.kind = Kind::Caw { off, len, fua };
            Ok(None)
        }
        _ => Err(sense::INVALID_OPCODE.into()),
    }
}

/// WRITE SAME(10/16) (SBC-3 5.42, 5.43).
fn write_same(
    t: &mut Task,
    cmd: &Command<'_>,
    g: &Geometry<'_>,
    s: &UnitState,
    lba: u64,
    n: u64,
    flags: u8,
) -> Res<Option<DataIn>> {
    let op = byte(cmd.cdb, 0);
    no_protect(flags)?;
    let unmap = flags & 0x08 != 0;
    let ndob = op == WRITE_SAME_16 && flags & 0x01 != 0;
    // A protected unit refuses the write first (libiscsi's ReadOnly
    // suite): a read-only export offers no UNMAP either.
    writable(g, s)?;
    if flags & 0x10 != 0 || (unmap && !g.export.can_trim) {
        // ANCHOR is not offered; UNMAP only where LBPWS says so.
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    if lba > g.blocks {
        return Err(sense::LBA_OUT_OF_RANGE.into());
    }
    // Zero blocks: from the LBA to the end of the unit (WSNZ is clear).
    let n = if n == 0 { g.blocks - lba } else { n };
    if n > max_ws_blocks(g) {
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    g.check_range(lba, n)?;
    if !ndob && cmd.data_out_len != g.bs {
        return Err(sense::INVALID_FIELD_IN_IU.into());
    }
    if n == 0 {
        return Ok(Some(DataIn::None));
    }
    let (off, len) = g.bytes(lba, n)?;
    let how = if ndob {
        zero_how(t, unmap)
    } else {
        t.out_want = g.bs;
        Ws::Later { unmap }
    };
    if matches!(how, Ws::Replicate | Ws::Later { .. }) {
        t.buf_len = len.min(WS_CHUNK);
    }
    t.kind = Kind::WriteSame {
        off,
        len,
        how,
        ndob,
    };
    Ok(None)
}

/// How a WRITE SAME of zeroes is done.
fn zero_how(t: &Task, unmap: bool) -> Ws {
    if unmap && t.can_trim {
        Ws::Discard
    } else if t.can_wz {
        Ws::Zeroes { no_hole: !unmap }
    } else {
        Ws::Replicate
    }
}

fn data_bio(cmd: BioCmd, off: u64, sg: &SgList, fua: bool) -> Bio {
    let mut b = Bio::with_data(cmd, off, sg.clone());
    b.fua = fua;
    b
}

/// Queues a task's first bios, its pages and Data-Out being in.
pub(super) fn start(t: &mut Task) -> Res<()> {
    let busy = Fail::Busy;
    match t.kind {
        Kind::Done | Kind::ModeSelect { .. } | Kind::PrOut { .. } => {}
        Kind::Read { off, fua, .. } => {
            let sg = t.buf.as_ref().ok_or(busy)?;
            let b = data_bio(BioCmd::Read, off, sg, fua);
            t.push(b);
        }
        Kind::Verify { off, .. } | Kind::Caw { off, .. } => {
            let sg = t.buf.as_ref().ok_or(busy)?;
            let b = data_bio(BioCmd::Read, off, sg, false);
            t.push(b);
        }
        Kind::Write { off, fua, .. } => {
            let sg = t.out_sg.as_ref().ok_or(busy)?;
            let b = data_bio(BioCmd::Write, off, sg, fua);
            t.push(b);
        }
        Kind::Flush => t.push(Bio::flush()),
        Kind::LbaStatus { lba, .. } => {
            let bs = u64::from(t.bs);
            let left = t.blocks.saturating_sub(lba).saturating_mul(bs);
            let len = left.min(1 << 36);
            t.push(Bio::no_data(
                BioCmd::GetAllocation,
                lba.saturating_mul(bs),
                len,
            ));
        }
        Kind::Unmap => {
            let p = t.out_bytes()?;
            for (lba, n) in unmap_list(&p, t.blocks)? {
                let bs = u64::from(t.bs);
                let (Some(off), Some(len)) = (lba.checked_mul(bs), n.checked_mul(bs)) else {
                    return Err(sense::LBA_OUT_OF_RANGE.into());
                };
                t.push(Bio::no_data(BioCmd::Discard, off, len));
            }
        }
        Kind::WriteSame {
            off,
            len,
            how,
            ndob,
        } => {
            let how = match how {
                Ws::Later { unmap } => {
                    let sg = t.out_sg.as_ref().ok_or(busy)?;
                    let mut block = alloc::vec![0u8; t.bs as usize];
                    sg.copy_to_slice(0, &mut block, &DataCounters::new())
                        .map_err(|_| sense::INTERNAL_FAILURE)?;
                    if block.iter().all(|&b| b == 0) {
                        zero_how(t, unmap)
                    } else {
                        let buf = t.buf.as_ref().ok_or(busy)?;
                        fill(buf, &block)?;
                        Ws::Replicate
                    }
                }
                h => h,
            };
            t.kind = Kind::WriteSame {
                off,
                len,
                how,
                ndob,
            };
            match how {
                Ws::Discard => t.push(Bio::no_data(BioCmd::Discard, off, len)),
                Ws::Zeroes { no_hole } => {
                    let mut b = Bio::no_data(BioCmd::WriteZeroes, off, len);
                    b.no_hole = no_hole;
                    t.push(b);
                }
                _ => next_chunk(t, off, len)?,
            }
        }
    }
    Ok(())
}

/// Fills the pages with copies of one block.
fn fill(buf: &SgList, block: &[u8]) -> Res<()> {
    let bs = block.len() as u64;
    buf.map(&DataCounters::new(), |at, b| {
        let mut i = 0usize;
        while i < b.len() {
            let k = ((at + i as u64) % bs) as usize;
            let n = (block.len() - k).min(b.len() - i);
            b[i..i + n].copy_from_slice(&block[k..k + n]);
            i += n;
        }
    })
    .map_err(|_| Fail::Check(sense::INTERNAL_FAILURE))
}

/// Queues the next WRITE SAME chunk.
fn next_chunk(t: &mut Task, off: u64, len: u64) -> Res<()> {
    let buf = t.buf.as_ref().ok_or(Fail::Busy)?;
    let n = buf.len_bytes().min(len.saturating_sub(t.pos));
    if n == 0 {
        return Ok(());
    }
    let sg = buf.slice(0, n);
    let at = off.checked_add(t.pos).ok_or(sense::LBA_OUT_OF_RANGE)?;
    let b = Bio::with_data(BioCmd::Write, at, sg);
    t.pos += n;
    t.push(b);
    Ok(())
}

/// The descriptors of an UNMAP parameter list (SBC-3 5.28.2), checked.
fn unmap_list(p: &[u8], blocks: u64) -> Res<Vec<(u64, u64)>> {
    if p.len() < 8 {
        return Err(sense::PARAM_LIST_LENGTH.into());
    }
    let data_len = be(p, 0, 2) as usize;
    let bd_len = be(p, 2, 2) as usize;
    if data_len + 2 > p.len() || bd_len + 8 > p.len() || bd_len + 6 > data_len.max(6) {
        return Err(sense::PARAM_LIST_LENGTH.into());
    }
    if !bd_len.is_multiple_of(16) {
        return Err(sense::INVALID_FIELD_IN_PARAM.into());
    }
    let count = bd_len / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(sense::INVALID_FIELD_IN_PARAM.into());
    }
    let mut v = Vec::new();
    for d in p[8..8 + bd_len].chunks_exact(16) {
        let lba = be(d, 0, 8);
        let n = be(d, 8, 4);
        if n > u64::from(MAX_UNMAP_BLOCKS) {
            return Err(sense::INVALID_FIELD_IN_PARAM.into());
        }
        match lba.checked_add(n) {
            Some(end) if end <= blocks => {}
            _ => return Err(sense::LBA_OUT_OF_RANGE.into()),
        }
        if n > 0 {
            v.push((lba, n));
        }
    }
    Ok(v)
}

/// A bio of the task came back without error.
pub(super) fn completed(t: &mut Task, bio: Bio) {
    if bio.cmd == BioCmd::GetAllocation {
        t.extents = bio.extents;
    }
}

/// Every bio queued so far is back without error: the next step, or the
/// answer.
pub(super) fn advance(t: &mut Task) {
    let r = step(t);
    match r {
        Ok(None) => {}
        Ok(Some(d)) => t.finish_data(d),
        Err(f) => t.finish_fail(f),
    }
}

fn step(t: &mut Task) -> Res<Option<DataIn>> {
    let busy = Fail::Busy;
    match t.kind {
        Kind::Read { .. } => Ok(Some(DataIn::Pages(t.buf.take().ok_or(busy)?))),
        Kind::Write {
            off, len, verify, ..
        } => {
            if !verify {
                return Ok(Some(DataIn::None));
            }
            if t.phase == 0 {
                t.phase = 1;
                let sg = t.buf.as_ref().ok_or(busy)?;
                let b = data_bio(BioCmd::Read, off, sg, false);
                t.push(b);
                return Ok(None);
            }
            let (a, b) = (t.out_sg.as_ref().ok_or(busy)?, t.buf.as_ref().ok_or(busy)?);
            miscompare(first_diff(a, 0, b, 0, len)?)?;
            Ok(Some(DataIn::None))
        }
        Kind::Verify { len, cmp, .. } => {
            let buf = t.buf.as_ref().ok_or(busy)?;
            match cmp {
                Cmp::None => {}
                Cmp::Full => {
                    let out = t.out_sg.as_ref().ok_or(busy)?;
                    miscompare(first_diff(out, 0, buf, 0, len)?)?;
                }
                Cmp::Block => {
                    let out = t.out_sg.as_ref().ok_or(busy)?;
                    let bs = u64::from(t.bs);
                    let mut at = 0;
                    while at < len {
                        let d = first_diff(out, 0, buf, at, bs)?.map(|d| d + at);
                        miscompare(d)?;
                        at += bs;
                    }
                }
            }
            Ok(Some(DataIn::None))
        }
        Kind::Caw { off, len, fua } => {
            if t.phase == 0 {
                let (out, buf) = (t.out_sg.as_ref().ok_or(busy)?, t.buf.as_ref().ok_or(busy)?);
                miscompare(first_diff(out, 0, buf, 0, len)?)?;
                t.phase = 1;
                let sg = out.slice(len, len);
                let mut b = Bio::with_data(BioCmd::Write, off, sg);
                b.fua = fua;
                t.push(b);
                return Ok(None);
            }
            Ok(Some(DataIn::None))
        }
        Kind::WriteSame { off, len, how, .. } => {
            if matches!(how, Ws::Replicate) && t.pos < len {
                next_chunk(t, off, len)?;
                return Ok(None);
            }
            Ok(Some(DataIn::None))
        }
        Kind::LbaStatus { lba, alloc } => Ok(Some(lba_status(t, lba, alloc))),
        _ => Ok(Some(DataIn::None)),
    }
}

/// MISCOMPARE with the offset of the first difference.
fn miscompare(d: Option<u64>) -> Res<()> {
    match d {
        None => Ok(()),
        Some(at) => Err(sense::MISCOMPARE_VERIFY.with_info(at).into()),
    }
}

/// Offset of the first byte where `len` bytes of `a` from `ao` and of `b`
/// from `bo` differ.
fn first_diff(a: &SgList, ao: u64, b: &SgList, bo: u64, len: u64) -> Res<Option<u64>> {
    let c = DataCounters::new();
    let mut x = [0u8; PAGE_SIZE];
    let mut y = [0u8; PAGE_SIZE];
    let ok = |e: u64, l: &SgList| e.checked_add(len).is_some_and(|end| end <= l.len_bytes());
    if !ok(ao, a) || !ok(bo, b) {
        return Err(sense::INTERNAL_FAILURE.into());
    }
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(PAGE_SIZE as u64) as usize;
        a.copy_to_slice(ao + at, &mut x[..n], &c)
            .map_err(|_| sense::INTERNAL_FAILURE)?;
        b.copy_to_slice(bo + at, &mut y[..n], &c)
            .map_err(|_| sense::INTERNAL_FAILURE)?;
        if let Some(i) = x[..n].iter().zip(&y[..n]).position(|(p, q)| p != q) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

/// The GET LBA STATUS parameter data (SBC-3 5.20.2) from the extents the
/// provider reported: one descriptor per run of mapped or deallocated
/// blocks (a block partly allocated counts as mapped).
fn lba_status(t: &Task, lba: u64, alloc: u32) -> DataIn {
    let bs = u64::from(t.bs);
    let max = (alloc.saturating_sub(8) / 16).max(1) as usize;
    let end = t.blocks;
    // (first block, blocks, deallocated)
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = lba.saturating_mul(bs);
    for x in &t.extents {
        if runs.len() > max {
            break;
        }
        let Some(next) = pos.checked_add(x.length) else {
            break;
        };
        // Blocks wholly inside a hole are deallocated; the rest is mapped.
        let (first, last) = if x.hole {
            (pos.div_ceil(bs), next / bs)
        } else {
            (pos / bs, next.div_ceil(bs))
        };
        let last = last.min(end);
        let cur = runs.last().map_or(lba, |r| r.0 + r.1);
        if first > cur {
            // A gap left by rounding a hole inwards is mapped.
            push_run(&mut runs, cur, first.min(end), false);
        }
        push_run(&mut runs, first.max(cur), last, x.hole);
        pos = next;
    }
    if runs.is_empty() {
        // Nothing known: all of it holds data.
        runs.push((lba, end.saturating_sub(lba).max(1), false));
    }
    runs.truncate(max);
    let mut v = alloc::vec![0u8; 8];
    for (first, n, dealloc) in runs {
        v.extend_from_slice(&first.to_be_bytes());
        v.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
        v.push(u8::from(dealloc));
        v.extend_from_slice(&[0; 3]);
    }
    let len = (v.len() - 4) as u32;
    v[0..4].copy_from_slice(&len.to_be_bytes());
    truncated(v, u64::from(alloc))
}

/// Appends blocks `[from, to)` to the runs, merging with the last run of
/// the same kind.
fn push_run(runs: &mut Vec<(u64, u64, bool)>, from: u64, to: u64, dealloc: bool) {
    if to <= from {
        return;
    }
    match runs.last_mut() {
        Some(r) if r.2 == dealloc && r.0 + r.1 == from => r.1 += to - from,
        _ => runs.push((from, to - from, dealloc)),
    }
}
