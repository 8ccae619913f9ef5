//! INQUIRY (SPC-4 6.6): the standard data and the VPD pages (00h
//! supported pages, 80h unit serial number, 83h device identification,
//! B0h block limits, B1h block device characteristics, B2h logical block
//! provisioning), and REPORT LUNS (SPC-4 6.33).

use super::pr::hex2;
use super::{be, byte, sense, truncated, DataIn, Geometry, Res, Unit};
use alloc::vec::Vec;

/// T10 vendor identification.
pub const VENDOR: &[u8; 8] = b"STRATA  ";
/// Product identification.
pub const PRODUCT: &[u8; 16] = b"Virtual Disk    ";
/// Product revision level.
pub const REVISION: &[u8; 4] = b"0001";

/// The VPD pages, in ascending order.
pub const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// Largest UNMAP descriptor count a parameter list may hold.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;

/// Largest WRITE SAME, in bytes.
pub const MAX_WRITE_SAME_BYTES: u64 = 1 << 30;

/// Largest UNMAP range in one descriptor, in blocks: no limit (the field
/// is 32 bits wide).
pub const MAX_UNMAP_BLOCKS: u32 = u32::MAX;

/// Largest COMPARE AND WRITE, in blocks.
pub fn max_caw_blocks(g: &Geometry<'_>) -> u8 {
    let by_transfer = g.max_transfer_blocks() / 2;
    by_transfer.clamp(1, 255) as u8
}

/// Largest WRITE SAME, in blocks.
pub fn max_ws_blocks(g: &Geometry<'_>) -> u64 {
    MAX_WRITE_SAME_BYTES / u64::from(g.bs)
}

/// FNV-1a over the target name and the LUN: the unit's identity.
fn unit_hash(target: &str, lun: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.bytes().chain(lun.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The unit serial number: 16 hex digits derived from target and LUN.
pub fn serial(target: &str, lun: u64) -> [u8; 16] {
    let mut s = [0u8; 16];
    for (i, b) in unit_hash(target, lun).to_be_bytes().iter().enumerate() {
        s[2 * i..2 * i + 2].copy_from_slice(&hex2(*b));
    }
    s
}

/// INQUIRY.
pub fn inquiry(cdb: &[u8], unit: &Unit<'_>, geo: Option<&Geometry<'_>>) -> Res<DataIn> {
    let evpd = byte(cdb, 1) & 0x01 != 0;
    if byte(cdb, 1) & 0x02 != 0 {
        // CMDDT is obsolete.
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    let page = byte(cdb, 2);
    let alloc = be(cdb, 3, 2);
    if !evpd {
        if page != 0 {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        return Ok(truncated(standard(geo.is_some()), alloc));
    }
    let Some(g) = geo else {
        return Err(sense::LU_NOT_SUPPORTED.into());
    };
    let mut v = alloc::vec![0u8, page, 0, 0];
    match page {
        0x00 => v.extend_from_slice(&VPD_PAGES),
        0x80 => v.extend_from_slice(&serial(unit.target, unit.lun)),
        0x83 => identification(&mut v, unit),
        0xb0 => block_limits(&mut v, g),
        0xb1 => {
            v.resize(64, 0);
            // Non-rotating medium.
            v[4..6].copy_from_slice(&1u16.to_be_bytes());
        }
        0xb2 => {
            let trim = g.export.can_trim;
            v.extend_from_slice(&[0, 0, 0, 0]);
            if trim {
                // LBPU, LBPWS, LBPWS10; LBPRZ stays clear: a discarded
                // block is not known to read back as zeroes.
                v[5] = 0x80 | 0x40 | 0x20;
                // Thin provisioned.
                v[6] = 0x02;
            }
        }
        _ => return Err(sense::INVALID_FIELD_IN_CDB.into()),
    }
    let len = (v.len() - 4) as u16;
    v[2..4].copy_from_slice(&len.to_be_bytes());
    Ok(truncated(v, alloc))
}

/// Standard INQUIRY data; peripheral qualifier 011b, type 1Fh when the
/// LUN has no unit.
fn standard(present: bool) -> Vec<u8> {
    let mut v = alloc::vec![0u8; 96];
    v[0] = if present { 0x00 } else { 0x7f };
    // SPC-4.
    v[2] = 0x06;
    // HISUP, response data format 2.
    v[3] = 0x12;
    v[4] = (v.len() - 5) as u8;
    // CMDQUE.
    v[7] = 0x02;
    v[8..16].copy_from_slice(VENDOR);
    v[16..32].copy_from_slice(PRODUCT);
    v[32..36].copy_from_slice(REVISION);
    // Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
    for (i, d) in [0x00a0u16, 0x0460, 0x04c0, 0x0960].iter().enumerate() {
        v[58 + 2 * i..60 + 2 * i].copy_from_slice(&d.to_be_bytes());
    }
    v
}

/// One designation descriptor.
fn designator(v: &mut Vec<u8>, proto_code_set: u8, piv_assoc_type: u8, id: &[u8]) {
    v.push(proto_code_set);
    v.push(piv_assoc_type);
    v.push(0);
    v.push(id.len() as u8);
    v.extend_from_slice(id);
}

/// A NUL-terminated name padded to a multiple of 4 bytes.
fn name_string(s: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&s[..s.len().min(250)]);
    n.push(0);
    while n.len() % 4 != 0 {
        n.push(0);
    }
    n
}

/// Device Identification VPD page designators (SPC-4 7.8.6).
fn identification(v: &mut Vec<u8>, unit: &Unit<'_>) {
    let h = unit_hash(unit.target, unit.lun);
    // Logical unit: NAA locally assigned (3h).
    let naa = (h & 0x0fff_ffff_ffff_ffff) | 0x3000_0000_0000_0000;
    designator(v, 0x01, 0x03, &naa.to_be_bytes());
    // Logical unit: T10 vendor ID based.
    let mut t10 = Vec::new();
    t10.extend_from_slice(VENDOR);
    t10.extend_from_slice(&serial(unit.target, unit.lun));
    designator(v, 0x02, 0x01, &t10);
    // Target port: SCSI name string "IQN,t,0x0001".
    let mut port = Vec::new();
    port.extend_from_slice(unit.target.as_bytes());
    port.extend_from_slice(b",t,0x0001");
    designator(v, 0x53, 0x98, &name_string(&port));
    // Target port: relative target port 1.
    designator(v, 0x51, 0x94, &[0, 0, 0, 1]);
    // Target device: SCSI name string.
    designator(v, 0x53, 0xa8, &name_string(unit.target.as_bytes()));
}

/// Block Limits VPD page (SBC-3 6.5.3).
fn block_limits(v: &mut Vec<u8>, g: &Geometry<'_>) {
    v.resize(64, 0);
    v[5] = max_caw_blocks(g);
    let gran = (g.export.preferred_block / g.bs).clamp(1, 0xffff) as u16;
    v[6..8].copy_from_slice(&gran.to_be_bytes());
    let max = g.max_transfer_blocks();
    v[8..12].copy_from_slice(&max.to_be_bytes());
    v[12..16].copy_from_slice(&max.to_be_bytes());
    if g.export.can_trim {
        v[20..24].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
        v[24..28].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        v[28..32].copy_from_slice(&u32::from(gran).to_be_bytes());
    }
    v[36..44].copy_from_slice(&max_ws_blocks(g).to_be_bytes());
}

/// REPORT LUNS.
pub fn report_luns(cdb: &[u8], unit: &Unit<'_>) -> Res<DataIn> {
    let select = byte(cdb, 2);
    let alloc = be(cdb, 6, 4);
    if alloc < 16 || select > 2 {
        return Err(sense::INVALID_FIELD_IN_CDB.into());
    }
    let mut v = alloc::vec![0u8; 8];
    // Select report 1 asks for well-known LUNs only, and there are none.
    if select != 1 {
        for &lun in unit.luns.iter().take(16384) {
            v.extend_from_slice(&encode_lun(lun));
        }
    }
    let len = (v.len() - 8) as u32;
    v[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(truncated(v, alloc))
}

/// The 8-byte SAM LUN of a LUN number.
pub fn encode_lun(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else if lun < 16384 {
        b[0] = 0x40 | (lun >> 8) as u8;
        b[1] = lun as u8;
    } else {
        b = lun.to_be_bytes();
    }
    b
}
