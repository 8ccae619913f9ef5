//! Mode parameters (SPC-4 7.5, SBC-3 6.4): the pages the unit has
//! (01h read-write error recovery, 08h caching, 0Ah control, 1Ch
//! informational exceptions), MODE SENSE(6/10) and MODE SELECT(6/10).
//! Only D_SENSE and SWP (control page) are changeable; SWP set makes the
//! unit write-protected for every nexus, and MODE SENSE reports WP.

use super::{be, byte, sense, truncated, DataIn, Geometry, Nexus, Res, Unit, UnitState};
use alloc::vec::Vec;

/// Page control: which values MODE SENSE reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
}

/// The pages, in the order MODE SENSE of all pages lists them.
const PAGES: [u8; 4] = [0x01, 0x08, 0x0a, 0x1c];

/// One page (its header included) as `pc` asks.
fn page(code: u8, pc: Pc, s: &UnitState, g: &Geometry<'_>) -> Option<Vec<u8>> {
    let mut p = match code {
        0x01 => alloc::vec![0x01, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        0x08 => {
            let mut p = alloc::vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            p
        }
        0x0a => {
            let mut p = alloc::vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 0x0a;
            p
        }
        0x1c => alloc::vec![0x1c, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        _ => return None,
    };
    match pc {
        Pc::Changeable => {
            if code == 0x0a {
                // D_SENSE; SWP.
                p[2] = 0x04;
                p[4] = 0x08;
            }
        }
        Pc::Current | Pc::Default => match code {
            // WCE: writes are cached until a flush when the provider has
            // a cache to flush.
            0x08 if g.export.can_flush => p[2] = 0x04,
            0x0a => {
                // D_SENSE, GLTSD; queue algorithm modifier 1 (unrestricted
                // reordering); SWP; busy timeout unlimited.
                let cur = pc == Pc::Current;
                p[2] = if cur && s.d_sense { 0x04 } else { 0 } | 0x02;
                p[3] = 0x10;
                p[4] = if cur && s.swp { 0x08 } else { 0 };
                p[8] = 0xff;
                p[9] = 0xff;
            }
            0x1c => {
                // DEXCPT: informational exceptions are not reported.
                p[2] = 0x08;
            }
            _ => {}
        },
    }
    Some(p)
}

/// MODE SENSE(6) and (10).
pub fn sense(cdb: &[u8], s: &UnitState, g: &Geometry<'_>) -> Res<DataIn> {
    let ten = byte(cdb, 0) == super::opcodes::MODE_SENSE_10;
    let dbd = byte(cdb, 1) & 0x08 != 0;
    let llbaa = ten && byte(cdb, 1) & 0x10 != 0;
    let pc = match byte(cdb, 2) >> 6 {
        0 => Pc::Current,
        1 => Pc::Changeable,
        2 => Pc::Default,
        _ => return Err(sense::SAVING_NOT_SUPPORTED.into()),
    };
    let code = byte(cdb, 2) & 0x3f;
    let sub = byte(cdb, 3);
    let alloc = if ten { be(cdb, 7, 2) } else { be(cdb, 4, 1) };
    let mut pages = Vec::new();
    if code == 0x3f {
        if sub != 0 && sub != 0xff {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        for c in PAGES {
            pages.extend(page(c, pc, s, g).unwrap_or_default());
        }
    } else {
        if sub != 0 {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        pages = page(code, pc, s, g).ok_or(sense::INVALID_FIELD_IN_CDB)?;
    }
    // Device-specific parameter: WP (read-only export or SWP), DPOFUA.
    let dsp = if g.export.read_only || s.swp { 0x80 } else { 0 } | 0x10;
    let bd = if dbd {
        Vec::new()
    } else if llbaa {
        let mut b = alloc::vec![0u8; 16];
        b[0..8].copy_from_slice(&g.blocks.to_be_bytes());
        b[12..16].copy_from_slice(&g.bs.to_be_bytes());
        b
    } else {
        let mut b = alloc::vec![0u8; 8];
        let n = u32::try_from(g.blocks).unwrap_or(u32::MAX);
        b[0..4].copy_from_slice(&n.to_be_bytes());
        b[5..8].copy_from_slice(&g.bs.to_be_bytes()[1..4]);
        b
    };
    let mut v = Vec::new();
    if ten {
        v.extend_from_slice(&[0, 0, 0, dsp, u8::from(llbaa), 0]);
        v.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        v.extend_from_slice(&[0, 0, dsp, bd.len() as u8]);
    }
    v.extend_from_slice(&bd);
    v.extend_from_slice(&pages);
    if ten {
        let n = (v.len() - 2) as u16;
        v[0..2].copy_from_slice(&n.to_be_bytes());
    } else {
        v[0] = (v.len() - 1).min(255) as u8;
    }
    Ok(truncated(v, alloc))
}

/// MODE SELECT(6) and (10) with their parameter list: every page must be
/// one the unit has, of its length, changing only changeable bits. A
/// change of D_SENSE or SWP raises MODE PARAMETERS CHANGED for the other
/// nexuses.
pub fn select(unit: &mut Unit<'_>, n: &Nexus<'_>, ten: bool, p: &[u8]) -> Res<()> {
    let Some(export) = unit.export else {
        return Err(sense::LU_NOT_SUPPORTED.into());
    };
    let g = Geometry::new(export);
    let hdr = if ten { 8 } else { 4 };
    if p.len() < hdr {
        return Err(sense::PARAM_LIST_LENGTH.into());
    }
    let bd_len = if ten { be(p, 6, 2) } else { be(p, 3, 1) } as usize;
    let Some(pages_at) = hdr.checked_add(bd_len).filter(|&e| e <= p.len()) else {
        return Err(sense::PARAM_LIST_LENGTH.into());
    };
    let long = ten && byte(p, 4) & 0x01 != 0;
    let bd = &p[hdr..pages_at];
    let (each, bs_at) = if long { (16, 12) } else { (8, 5) };
    if !bd_len.is_multiple_of(each) {
        return Err(sense::PARAM_LIST_LENGTH.into());
    }
    for d in bd.chunks(each) {
        // The block length cannot change.
        let bs = if long {
            be(d, bs_at, 4)
        } else {
            be(d, bs_at, 3)
        };
        if bs != u64::from(g.bs) {
            return Err(sense::INVALID_FIELD_IN_PARAM.into());
        }
    }
    let mut d_sense = unit.state.d_sense;
    let mut swp = unit.state.swp;
    let mut at = pages_at;
    while at < p.len() {
        let code = byte(p, at) & 0x3f;
        if byte(p, at) & 0x40 != 0 {
            // No subpages.
            return Err(sense::INVALID_FIELD_IN_PARAM.into());
        }
        let len = usize::from(byte(p, at + 1)) + 2;
        let Some(end) = at.checked_add(len).filter(|&e| e <= p.len()) else {
            return Err(sense::PARAM_LIST_LENGTH.into());
        };
        let new = &p[at..end];
        let cur = page(code, Pc::Current, unit.state, &g).ok_or(sense::INVALID_FIELD_IN_PARAM)?;
        let chg =
            page(code, Pc::Changeable, unit.state, &g).ok_or(sense::INVALID_FIELD_IN_PARAM)?;
        if new.len() != cur.len() {
            return Err(sense::INVALID_FIELD_IN_PARAM.into());
        }
        for i in 2..cur.len() {
            if (new[i] ^ cur[i]) & !chg[i] != 0 {
                return Err(sense::INVALID_FIELD_IN_PARAM.into());
            }
        }
        if code == 0x0a {
            d_sense = new[2] & 0x04 != 0;
            swp = new[4] & 0x08 != 0;
        }
        at = end;
    }
    if (d_sense, swp) != (unit.state.d_sense, unit.state.swp) {
        unit.state.d_sense = d_sense;
        unit.state.swp = swp;
        unit.state.ua_others(n.id, sense::UA_MODE_CHANGED);
    }
    Ok(())
}
