//! The table of the commands the layer implements: dispatch looks every
//! CDB up in it (opcode, service action, reservation class), and REPORT
//! SUPPORTED OPERATION CODES (SPC-4 6.35) is built from it, so the report
//! cannot list a command the layer does not run, nor miss one.

use super::pr::Access;
use super::{be, byte, sense, truncated, DataIn, Res};
use crate::session::ExportInfo;
use alloc::vec::Vec;

/// TEST UNIT READY.
pub const TEST_UNIT_READY: u8 = 0x00;
/// REQUEST SENSE.
pub const REQUEST_SENSE: u8 = 0x03;
/// READ(6).
pub const READ_6: u8 = 0x08;
/// WRITE(6).
pub const WRITE_6: u8 = 0x0a;
/// INQUIRY.
pub const INQUIRY: u8 = 0x12;
/// MODE SELECT(6).
pub const MODE_SELECT_6: u8 = 0x15;
/// RESERVE(6).
pub const RESERVE_6: u8 = 0x16;
/// RELEASE(6).
pub const RELEASE_6: u8 = 0x17;
/// MODE SENSE(6).
pub const MODE_SENSE_6: u8 = 0x1a;
/// START STOP UNIT.
pub const START_STOP_UNIT: u8 = 0x1b;
/// READ CAPACITY(10).
pub const READ_CAPACITY_10: u8 = 0x25;
/// READ(10).
pub const READ_10: u8 = 0x28;
/// WRITE(10).
pub const WRITE_10: u8 = 0x2a;
/// WRITE AND VERIFY(10).
pub const WRITE_VERIFY_10: u8 = 0x2e;
/// VERIFY(10).
pub const VERIFY_10: u8 = 0x2f;
/// PRE-FETCH(10).
pub const PRE_FETCH_10: u8 = 0x34;
/// SYNCHRONIZE CACHE(10).
pub const SYNC_CACHE_10: u8 = 0x35;
/// WRITE SAME(10).
pub const WRITE_SAME_10: u8 = 0x41;
/// UNMAP.
pub const UNMAP: u8 = 0x42;
/// MODE SELECT(10).
pub const MODE_SELECT_10: u8 = 0x55;
/// MODE SENSE(10).
pub const MODE_SENSE_10: u8 = 0x5a;
/// PERSISTENT RESERVE IN.
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
/// PERSISTENT RESERVE OUT.
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
/// READ(16).
pub const READ_16: u8 = 0x88;
/// COMPARE AND WRITE.
pub const COMPARE_AND_WRITE: u8 = 0x89;
/// WRITE(16).
pub const WRITE_16: u8 = 0x8a;
/// WRITE AND VERIFY(16).
pub const WRITE_VERIFY_16: u8 = 0x8e;
/// VERIFY(16).
pub const VERIFY_16: u8 = 0x8f;
/// PRE-FETCH(16).
pub const PRE_FETCH_16: u8 = 0x90;
/// SYNCHRONIZE CACHE(16).
pub const SYNC_CACHE_16: u8 = 0x91;
/// WRITE SAME(16).
pub const WRITE_SAME_16: u8 = 0x93;
/// SERVICE ACTION IN(16): READ CAPACITY(16), GET LBA STATUS.
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
/// REPORT LUNS.
pub const REPORT_LUNS: u8 = 0xa0;
/// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES.
pub const MAINTENANCE_IN: u8 = 0xa3;
/// READ(12).
pub const READ_12: u8 = 0xa8;
/// WRITE(12).
pub const WRITE_12: u8 = 0xaa;
/// WRITE AND VERIFY(12).
pub const WRITE_VERIFY_12: u8 = 0xae;
/// VERIFY(12).
pub const VERIFY_12: u8 = 0xaf;

/// SERVICE ACTION IN(16) READ CAPACITY(16).
pub const SA_READ_CAPACITY_16: u8 = 0x10;
/// SERVICE ACTION IN(16) GET LBA STATUS.
pub const SA_GET_LBA_STATUS: u8 = 0x12;
/// MAINTENANCE IN REPORT SUPPORTED OPERATION CODES.
pub const SA_REPORT_OPCODES: u8 = 0x0c;

/// One command the layer implements.
#[derive(Debug)]
pub struct Entry {
    /// Operation code.
    pub opcode: u8,
    /// Service action (in CDB byte 1, bits 4:0), for opcodes that have one.
    pub sa: Option<u8>,
    /// CDB usage data: the bits of each CDB byte the layer looks at; its
    /// length is the CDB length.
    pub usage: &'static [u8],
    /// Which reservations it conflicts with.
    pub access: Access,
    /// It runs, and leaves unit attentions pending (INQUIRY, REPORT LUNS,
    /// REQUEST SENSE).
    pub ua_exempt: bool,
    /// Only units whose provider accepts Discard have it (UNMAP).
    pub trim: bool,
}

impl Entry {
    /// Its CDB length.
    pub fn cdb_len(&self) -> u8 {
        self.usage.len() as u8
    }

    /// Whether this unit has the command.
    fn offered(&self, export: Option<&ExportInfo>) -> bool {
        !self.trim || export.is_some_and(|e| e.can_trim)
    }
}

const fn e(opcode: u8, sa: Option<u8>, usage: &'static [u8], access: Access) -> Entry {
    Entry {
        opcode,
        sa,
        usage,
        access,
        ua_exempt: false,
        trim: false,
    }
}

const fn exempt(mut x: Entry) -> Entry {
    x.ua_exempt = true;
    x
}

const fn trim(mut x: Entry) -> Entry {
    x.trim = true;
    x
}

const RW10: [u8; 10] = [0, 0xfa, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x07];
const RW12: [u8; 12] = [
    0, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x07,
];
const RW16: [u8; 16] = [
    0, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x07,
];

const fn with(mut u: [u8; 16], op: u8, b1: u8) -> [u8; 16] {
    u[0] = op;
    u[1] = b1;
    u
}
const fn with10(mut u: [u8; 10], op: u8, b1: u8) -> [u8; 10] {
    u[0] = op;
    u[1] = b1;
    u
}
const fn with12(mut u: [u8; 12], op: u8, b1: u8) -> [u8; 12] {
    u[0] = op;
    u[1] = b1;
    u
}

const U_READ10: [u8; 10] = with10(RW10, READ_10, 0xfe);
const U_WRITE10: [u8; 10] = with10(RW10, WRITE_10, 0xfa);
const U_WAV10: [u8; 10] = with10(RW10, WRITE_VERIFY_10, 0xf2);
const U_VERIFY10: [u8; 10] = with10(RW10, VERIFY_10, 0xf6);
const U_PREFETCH10: [u8; 10] = with10(RW10, PRE_FETCH_10, 0x02);
const U_SYNC10: [u8; 10] = with10(RW10, SYNC_CACHE_10, 0x02);
const U_WS10: [u8; 10] = with10(RW10, WRITE_SAME_10, 0xf8);
const U_READ12: [u8; 12] = with12(RW12, READ_12, 0xfe);
const U_WRITE12: [u8; 12] = with12(RW12, WRITE_12, 0xfa);
const U_WAV12: [u8; 12] = with12(RW12, WRITE_VERIFY_12, 0xf2);
const U_VERIFY12: [u8; 12] = with12(RW12, VERIFY_12, 0xf6);
const U_READ16: [u8; 16] = with(RW16, READ_16, 0xfe);
const U_WRITE16: [u8; 16] = with(RW16, WRITE_16, 0xfa);
const U_WAV16: [u8; 16] = with(RW16, WRITE_VERIFY_16, 0xf2);
const U_VERIFY16: [u8; 16] = with(RW16, VERIFY_16, 0xf6);
const U_PREFETCH16: [u8; 16] = with(RW16, PRE_FETCH_16, 0x02);
const U_SYNC16: [u8; 16] = with(RW16, SYNC_CACHE_16, 0x02);
const U_WS16: [u8; 16] = with(RW16, WRITE_SAME_16, 0xf9);
const U_CAW: [u8; 16] = [
    COMPARE_AND_WRITE,
    0xfa,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0,
    0,
    0,
    0xff,
    0x1f,
    0x07,
];
const U_RC16: [u8; 16] = [
    SERVICE_ACTION_IN_16,
    SA_READ_CAPACITY_16,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0x01,
    0x07,
];
const U_GLS: [u8; 16] = [
    SERVICE_ACTION_IN_16,
    SA_GET_LBA_STATUS,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0,
    0x07,
];
const fn pr_in(sa: u8) -> [u8; 10] {
    [PERSISTENT_RESERVE_IN, sa, 0, 0, 0, 0, 0, 0xff, 0xff, 0x07]
}
const fn pr_out(sa: u8) -> [u8; 10] {
    [
        PERSISTENT_RESERVE_OUT,
        sa,
        0xff,
        0,
        0,
        0xff,
        0xff,
        0xff,
        0xff,
        0x07,
    ]
}
const PRI0: [u8; 10] = pr_in(0);
const PRI1: [u8; 10] = pr_in(1);
const PRI2: [u8; 10] = pr_in(2);
const PRI3: [u8; 10] = pr_in(3);
const PRO0: [u8; 10] = pr_out(0);
const PRO1: [u8; 10] = pr_out(1);
const PRO2: [u8; 10] = pr_out(2);
const PRO3: [u8; 10] = pr_out(3);
const PRO4: [u8; 10] = pr_out(4);
const PRO5: [u8; 10] = pr_out(5);
const PRO6: [u8; 10] = pr_out(6);

/// Every command the layer implements, in opcode order.
pub static TABLE: &[Entry] = &[
    e(
        TEST_UNIT_READY,
        None,
        &[TEST_UNIT_READY, 0, 0, 0, 0, 0x07],
        Access::Always,
    ),
    exempt(e(
        REQUEST_SENSE,
        None,
        &[REQUEST_SENSE, 0x01, 0, 0, 0xff, 0x07],
        Access::Always,
    )),
    e(
        READ_6,
        None,
        &[READ_6, 0x1f, 0xff, 0xff, 0xff, 0x07],
        Access::Read,
    ),
    e(
        WRITE_6,
        None,
        &[WRITE_6, 0x1f, 0xff, 0xff, 0xff, 0x07],
        Access::Write,
    ),
    exempt(e(
        INQUIRY,
        None,
        &[INQUIRY, 0x01, 0xff, 0xff, 0xff, 0x07],
        Access::Always,
    )),
    e(
        MODE_SELECT_6,
        None,
        &[MODE_SELECT_6, 0x11, 0, 0, 0xff, 0x07],
        Access::Write,
    ),
    e(
        RESERVE_6,
        None,
        &[RESERVE_6, 0, 0, 0, 0, 0x07],
        Access::Spc2,
    ),
    e(
        RELEASE_6,
        None,
        &[RELEASE_6, 0, 0, 0, 0, 0x07],
        Access::Spc2,
    ),
    e(
        MODE_SENSE_6,
        None,
        &[MODE_SENSE_6, 0x08, 0xff, 0xff, 0xff, 0x07],
        Access::Read,
    ),
    e(
        START_STOP_UNIT,
        None,
        &[START_STOP_UNIT, 0x01, 0, 0x0f, 0xf7, 0x07],
        Access::Write,
    ),
    e(
        READ_CAPACITY_10,
        None,
        &[
            READ_CAPACITY_10,
            0,
            0xff,
            0xff,
            0xff,
            0xff,
            0,
            0,
            0x01,
            0x07,
        ],
        Access::Always,
    ),
    e(READ_10, None, &U_READ10, Access::Read),
    e(WRITE_10, None, &U_WRITE10, Access::Write),
    e(WRITE_VERIFY_10, None, &U_WAV10, Access::Write),
    e(VERIFY_10, None, &U_VERIFY10, Access::Read),
    e(PRE_FETCH_10, None, &U_PREFETCH10, Access::Read),
    e(SYNC_CACHE_10, None, &U_SYNC10, Access::Write),
    e(WRITE_SAME_10, None, &U_WS10, Access::Write),
    trim(e(
        UNMAP,
        None,
        &[UNMAP, 0, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0x07],
        Access::Write,
    )),
    e(
        MODE_SELECT_10,
        None,
        &[MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x07],
        Access::Write,
    ),
    e(
        MODE_SENSE_10,
        None,
        &[MODE_SENSE_10, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x07],
        Access::Read,
    ),
    e(PERSISTENT_RESERVE_IN, Some(0), &PRI0, Access::Pr),
    e(PERSISTENT_RESERVE_IN, Some(1), &PRI1, Access::Pr),
    e(PERSISTENT_RESERVE_IN, Some(2), &PRI2, Access::Pr),
    e(PERSISTENT_RESERVE_IN, Some(3), &PRI3, Access::Pr),
    e(PERSISTENT_RESERVE_OUT, Some(0), &PRO0, Access::Pr),
    e(PERSISTENT_RESERVE_OUT, Some(1), &PRO1, Access::Pr),
    e(PERSISTENT_RESERVE_OUT, Some(2), &PRO2, Access::Pr),
    e(PERSISTENT_RESERVE_OUT, Some(3), &PRO3, Access::Pr),
    e(PERSISTENT_RESERVE_OUT, Some(4), &PRO4, Access::Pr),
    e(PERSISTENT_RESERVE_OUT, Some(5), &PRO5, Access::Pr),
    e(PERSISTENT_RESERVE_OUT, Some(6), &PRO6, Access::Pr),
    e(READ_16, None, &U_READ16, Access::Read),
    e(COMPARE_AND_WRITE, None, &U_CAW, Access::Write),
    e(WRITE_16, None, &U_WRITE16, Access::Write),
    e(WRITE_VERIFY_16, None, &U_WAV16, Access::Write),
    e(VERIFY_16, None, &U_VERIFY16, Access::Read),
    e(PRE_FETCH_16, None, &U_PREFETCH16, Access::Read),
    e(SYNC_CACHE_16, None, &U_SYNC16, Access::Write),
    e(WRITE_SAME_16, None, &U_WS16, Access::Write),
    e(
        SERVICE_ACTION_IN_16,
        Some(SA_READ_CAPACITY_16),
        &U_RC16,
        Access::Always,
    ),
    e(
        SERVICE_ACTION_IN_16,
        Some(SA_GET_LBA_STATUS),
        &U_GLS,
        Access::Read,
    ),
    exempt(e(
        REPORT_LUNS,
        None,
        &[
            REPORT_LUNS,
            0,
            0xff,
            0,
            0,
            0,
            0xff,
            0xff,
            0xff,
            0xff,
            0,
            0x07,
        ],
        Access::Always,
    )),
    e(
        MAINTENANCE_IN,
        Some(SA_REPORT_OPCODES),
        &[
            MAINTENANCE_IN,
            SA_REPORT_OPCODES,
            0x87,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0,
            0x07,
        ],
        Access::Always,
    ),
    e(READ_12, None, &U_READ12, Access::Read),
    e(WRITE_12, None, &U_WRITE12, Access::Write),
    e(WRITE_VERIFY_12, None, &U_WAV12, Access::Write),
    e(VERIFY_12, None, &U_VERIFY12, Access::Read),
];

/// The entry for a CDB: INVALID COMMAND OPERATION CODE for an opcode the
/// unit does not have, INVALID FIELD IN CDB for an unknown service action.
pub fn lookup(cdb: &[u8], export: Option<&ExportInfo>) -> Res<&'static Entry> {
    let op = byte(cdb, 0);
    let sa = byte(cdb, 1) & 0x1f;
    let mut known = false;
    for x in TABLE.iter().filter(|x| x.opcode == op && x.offered(export)) {
        known = true;
        if x.sa.is_none_or(|s| s == sa) {
            return Ok(x);
        }
    }
    Err(if known {
        sense::INVALID_FIELD_IN_CDB
    } else {
        sense::INVALID_OPCODE
    }
    .into())
}

/// Nominal and recommended command timeouts, in seconds.
const TIMEOUT: u32 = 30;

fn timeouts(v: &mut Vec<u8>) {
    v.extend_from_slice(&[0x00, 0x0a, 0, 0]);
    v.extend_from_slice(&TIMEOUT.to_be_bytes());
    v.extend_from_slice(&TIMEOUT.to_be_bytes());
}

/// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN, service action 0Ch).
pub fn report(cdb: &[u8], export: Option<&ExportInfo>) -> Res<DataIn> {
    let rctd = byte(cdb, 2) & 0x80 != 0;
    let options = byte(cdb, 2) & 0x07;
    let op = byte(cdb, 3);
    let sa = be(cdb, 4, 2);
    let alloc = be(cdb, 6, 4);
    let mut v = Vec::new();
    match options {
        0 => {
            v.extend_from_slice(&[0; 4]);
            for x in TABLE.iter().filter(|x| x.offered(export)) {
                v.push(x.opcode);
                v.push(0);
                v.extend_from_slice(&u16::from(x.sa.unwrap_or(0)).to_be_bytes());
                v.push(0);
                v.push(u8::from(rctd) << 1 | u8::from(x.sa.is_some()));
                v.extend_from_slice(&u16::from(x.cdb_len()).to_be_bytes());
                if rctd {
                    timeouts(&mut v);
                }
            }
            let n = (v.len() - 4) as u32;
            v[0..4].copy_from_slice(&n.to_be_bytes());
        }
        1..=3 => {
            let mut found = None;
            let mut has_sa = false;
            for x in TABLE.iter().filter(|x| x.opcode == op && x.offered(export)) {
                has_sa |= x.sa.is_some();
                if x.sa.is_none() || x.sa.map(u64::from) == Some(sa) {
                    found = Some(x);
                }
            }
            // Option 1 is for opcodes without service actions, option 2
            // for those with (SPC-4 6.35.2).
            if (options == 1 && has_sa) || (options == 2 && found.is_some() && !has_sa) {
                // The reporting options byte is what is wrong (libiscsi
                // reads a pointer-less refusal as RSOC not implemented).
                return Err(sense::INVALID_FIELD_IN_CDB.at_cdb(2).into());
            }
            match found {
                Some(x) => {
                    v.push(0);
                    v.push(u8::from(rctd) << 7 | 0x03);
                    v.extend_from_slice(&u16::from(x.cdb_len()).to_be_bytes());
                    v.extend_from_slice(x.usage);
                    if rctd {
                        timeouts(&mut v);
                    }
                }
                None => v.extend_from_slice(&[0, 0x01, 0, 0]),
            }
        }
        _ => return Err(sense::INVALID_FIELD_IN_CDB.at_cdb(2).into()),
    }
    Ok(truncated(v, alloc))
}
